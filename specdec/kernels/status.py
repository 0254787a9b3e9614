"""Per-row status codes the kernels write beside their results, read back in the step's one copy.

-inf in logits means "this token is impossible" (allowed-token lists, logit bias and grammar masks
all work that way): it is never a bad number. Only NaN and +inf are. A row whose deciding position
has no possible token at all has nothing to emit: it fails, and is never emitted as some id.
Codes are ordered so that the larger wins when a row collects several (`torch.maximum`).
"""

ROW_OK = 0
ROW_NO_TOKEN = 1  # the position that decides has no possible token (every logit -inf, no mass)
ROW_NONFINITE = 2  # a NaN or +inf among the row's logits or probabilities


def greedy_scan(logits):
    """(tokens, nonfinite, no_token) over the last dimension of float logits [..., V], in one
    read: the first maximal id, whether a NaN or +inf is among the logits, whether every one is
    -inf. torch.max propagates NaN, and +inf is its own maximum, so the maximum alone says which:
    one pass instead of the five (isnan, isposinf, any, isneginf-all, argmax) it replaces, which
    at SmolLM2's 49152 ids were ~1 ms of a CPU decode step per call."""
    values, tokens = logits.max(dim=-1)
    return tokens, values.isnan() | values.isposinf(), values.isneginf()

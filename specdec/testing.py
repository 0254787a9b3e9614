"""Tiny random checkpoints, for tests and for trying specdec without downloading weights.

    from specdec.testing import write_tiny_checkpoint
    path = write_tiny_checkpoint("/tmp/tiny-llama", "llama", vocab_size=320)

writes a real Hugging Face checkpoint directory: ``config.json`` and ``model.safetensors`` saved by
`transformers`' ``save_pretrained``, and a byte-level BPE tokenizer trained with `tokenizers`. The
loader treats it exactly like a downloaded one. ``vocab_size`` is the logits width; the tokenizer
has ``tokenizer_vocab`` entries, so a larger ``vocab_size`` gives a padded vocabulary, as real
checkpoints often have.

Also the plain helpers the test suite shares (its fixtures live in ``tests/conftest.py``): the
architectures and pairs the fixtures build, the `transformers` reference and greedy comparison
with near-tie tolerance, a χ² test, a synthetic cost model, and a server on a loopback port.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

from specdec.grammar import Constraint, ConstraintKind
from specdec.tokenization import END_OF_TEXT, train_byte_bpe

# One constraint of each kind, for the constrained-output tests (engine, router): a JSON Schema
# with a bounded string, an integer and an enum, any JSON object, a regex, and an EBNF grammar.
EXAMPLE_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
EXAMPLE_CONSTRAINTS = {
    "schema": Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(EXAMPLE_SCHEMA)),
    "json": Constraint(ConstraintKind.JSON_OBJECT),
    "regex": Constraint(ConstraintKind.REGEX, r"(cat|dog) [0-9]{1,3}!"),
    "grammar": Constraint(ConstraintKind.GRAMMAR, 'root ::= "[" item ("," item)* "]"\nitem ::= [a-c]+'),
}

# A small mixed corpus: enough structure for BPE merges, embedded so nothing is read from disk.
_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n",
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one.",
    "while True:\n    line = f.readline()\n    if not line:\n        break\n",
    "return {'key': value, 'items': [1, 2, 3]}\n",
    "Hello, world! How are you today? I am fine, thank you.",
    "try:\n    x = int(s)\nexcept ValueError:\n    x = 0\n",
] * 4

# Per-architecture defaults for a tiny model; the caller's keyword arguments override them.
# Each exercises what makes its family different: windows shorter than the test sequences, a
# head_dim that is not hidden / heads, partial rotary, soft-capping, tied embeddings.
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 24},
    "phi3": {
        "sliding_window": 20,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
    },
    "gemma2": {
        "head_dim": 32,
        "sliding_window": 12,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
}


@functools.lru_cache(maxsize=8)
def _tokenizer(vocab: int) -> Any:
    return train_byte_bpe(_CORPUS, vocab_size=vocab, min_frequency=1)


def tiny_tokenizer(vocab: int = 300) -> Any:
    """The test tokenizer with `vocab` entries (ids 0..2 are the special tokens)."""
    return _tokenizer(vocab)


@functools.lru_cache(maxsize=4)
def word_tokenizer(vocab: int = 16) -> Any:
    """A word-level tokenizer of `vocab` entries ("w3", "w4", ... after the three specials): for
    tests that need a vocabulary small enough to enumerate joint distributions exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from specdec.tokenization import CHAT_TEMPLATE, IM_END, IM_START, SPECIAL_TOKENS

    words = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    words.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab)})
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token=END_OF_TEXT))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_checkpoint(
    path: str | os.PathLike[str],
    arch: str = "llama",
    *,
    vocab_size: int = 320,
    tokenizer_vocab: int = 300,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    initializer_range: float = 0.1,
    tokenizer: str = "bpe",
    **overrides: Any,
) -> Path:
    """Write a randomly initialised `arch` checkpoint with a real tokenizer to `path`.

    tokenizer: "bpe" (byte-level BPE of `tokenizer_vocab` entries) or "words" (word-level)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if vocab_size < tokenizer_vocab:
        raise ValueError("vocab_size (logits width) must be >= tokenizer_vocab")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer not in ("bpe", "words"):
        raise ValueError(f"tokenizer must be 'bpe' or 'words', got {tokenizer!r}")
    tok = tiny_tokenizer(tokenizer_vocab) if tokenizer == "bpe" else word_tokenizer(tokenizer_vocab)
    eos = tok.convert_tokens_to_ids(END_OF_TEXT)
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": initializer_range,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        **_ARCH_DEFAULTS.get(arch, {}),
    }
    kwargs.update(overrides)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def perturb_checkpoint(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], noise: float, seed: int = 0
) -> Path:
    """Copy checkpoint `src` to `dst` with Gaussian noise of relative scale `noise` on every weight:
    a "draft" that agrees with its target often but not always."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    weights = load_file(str(src / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    noisy = {}
    for name, tensor in weights.items():
        scale = tensor.float().std().item() if tensor.numel() > 1 else 0.0
        noisy[name] = tensor + noise * scale * torch.randn(
            tensor.shape, generator=generator, dtype=tensor.dtype
        )
    save_file(noisy, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------- test helpers

TOKENIZER_VOCAB = 300
PADDED_VOCAB = 320  # logits width > tokenizer vocabulary, as in many real checkpoints

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


# name -> (model_type, checkpoint kwargs). Each is a distinct feature set of the one decoder.
ARCHITECTURES = {
    "llama": ("llama", {"vocab_size": PADDED_VOCAB, "rope_parameters": LLAMA3_ROPE}),
    "llama-linear-rope-tied": (
        "llama",
        {
            "rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
            "tie_word_embeddings": True,
        },
    ),
    "llama-bias-mha": ("llama", {"attention_bias": True, "mlp_bias": True, "num_kv_heads": 4}),
    "mistral": ("mistral", {"vocab_size": PADDED_VOCAB}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"vocab_size": PADDED_VOCAB}),
    "phi3": ("phi3", {}),
    "gemma2": ("gemma2", {"vocab_size": PADDED_VOCAB}),
}


# Draft/target pairs: (target model_type, target kwargs, draft kwargs). The drafts are shallower
# and narrower, share the tokenizer, and (for some) pad their vocabulary differently.
PAIRS = {
    "llama": (
        "llama",
        {"vocab_size": PADDED_VOCAB, "num_layers": 3, "seed": 1},
        {"vocab_size": 310, "num_layers": 1, "hidden_size": 32, "intermediate_size": 64, "seed": 2},
    ),
    "qwen2": (
        "qwen2",
        {"num_layers": 3, "seed": 3},
        {"num_layers": 1, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1, "seed": 4},
    ),
    "gemma2": (
        "gemma2",
        {"vocab_size": PADDED_VOCAB, "num_layers": 2, "seed": 5},
        {"num_layers": 1, "hidden_size": 32, "head_dim": 16, "seed": 6},
    ),
}


def feature_draft(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], feature_scale: float = 0.1, seed: int = 0
) -> Path:
    """Copy the draft checkpoint `src` to `dst` as a feature-reading (EAGLE) draft: its fc passes
    the embedding through and adds `feature_scale` x a random projection of the target's feature,
    so it drafts much as `src` does while every proposal depends on the features it is fed."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config["specdec_feature_input"] = True
    (dst / "config.json").write_text(json.dumps(config))
    state = load_file(str(src / "model.safetensors"))
    hidden = config["hidden_size"]
    generator = torch.Generator().manual_seed(seed)
    mix = feature_scale * torch.randn(hidden, hidden, generator=generator) / hidden**0.5
    state["model.fc.weight"] = torch.cat([torch.eye(hidden), mix], dim=1)
    state["model.fc.bias"] = torch.zeros(hidden)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def hf_reference(path):
    """The `transformers` model of a checkpoint, fp32 with eager attention: the ground truth."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return model.eval().requires_grad_(False)


def prompt_logits(loaded: Any, tokens: list[int]) -> torch.Tensor:
    """Our logits [len(tokens), vocab] for one prompt through a loaded model, with a fresh cache."""
    from specdec.batching import Row, make_batch
    from specdec.models.kv_cache import CacheLayout, KVCache

    cache = KVCache(loaded.config, CacheLayout(1, 64, 4), torch.float32, "cpu")
    loaded.model.init_rope(cache.layout.capacity)
    batch = make_batch([Row(0, 0, tokens)], torch.device("cpu"), cache.layout.capacity)
    with torch.no_grad():
        return loaded.model(batch, cache)[0]


def joint_of_three(last_logits: Any, prompt: list[int], vocab: int, params: Any) -> Any:
    """P(t1, t2, t3 | prompt) [vocab**3] (numpy float64) under the sampling transform of `params`,
    from `last_logits(sequences [n, L]) -> [n, >= vocab]`, the model's logits after each sequence."""
    import itertools

    from specdec.sampling import SamplingTensors, probabilities

    st = lambda n: SamplingTensors.from_params([params] * n, torch.device("cpu"))  # noqa: E731
    v = vocab
    with torch.no_grad():
        p1 = probabilities(last_logits(torch.tensor([prompt]))[:, :v], st(1))[0]
        p2 = probabilities(last_logits(torch.tensor([prompt + [a] for a in range(v)]))[:, :v], st(v))
        seqs3 = torch.tensor([prompt + [a, b] for a, b in itertools.product(range(v), range(v))])
        p3 = probabilities(last_logits(seqs3)[:, :v], st(v * v)).view(v, v, v)
    return (p1[:, None, None] * p2[:, :, None] * p3).flatten().double().numpy()


def sampled_joint_of_three(
    engine: Any,
    prompt: list[int],
    vocab: int,
    params: Any,
    gamma: int,
    n: int,
    seed_base: int = 0,
    constraint: Any = None,
    agreement: tuple[float, float] = (0.2, 0.95),
    external_draft: list[int] | None = None,
) -> Any:
    """Counts [vocab**3] (numpy) of the first three tokens of `n` seeded speculative requests
    (seeds seed_base, seed_base + 1, ...) under `params`' sampling transform at a forced `gamma`
    (and `constraint`, which must rule out an end of sequence in three tokens: a constraint
    cannot ignore it), every request with `external_draft` if given (a prediction: verified as
    point masses); asserts the draft agreed often but not always (an acceptance rate within
    `agreement`), or the test would say nothing of the rule."""
    import numpy as np

    from specdec.request import Mode
    from specdec.sampling import SamplingParams

    requests = [
        engine.make_request(
            prompt,
            SamplingParams(
                max_new_tokens=3, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                seed=seed_base + i, ignore_eos=constraint is None,
            ),
            Mode.SPECULATIVE,
            gamma,
            constraint=constraint,
            external_draft=external_draft,
        )
        for i in range(n)
    ]  # fmt: skip
    results = engine.generate(requests)
    counts = np.zeros(vocab**3)
    for r in results:
        a, b, c = r.token_ids
        counts[(a * vocab + b) * vocab + c] += 1
    drafted = sum(r.stats.drafted_tokens for r in results)
    accepted = sum(r.stats.accepted_tokens for r in results)
    low, high = agreement  # the acceptance rate that makes the test say something of the rule
    assert low < accepted / drafted < high, (
        f"the draft should agree often but not always: {accepted}/{drafted}"
    )
    return counts


def random_prompt(generator: torch.Generator, length: int, vocab: int = TOKENIZER_VOCAB) -> list[int]:
    # Ids from 3 up: 0..2 are the special tokens (EOS would end generation at once).
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, vocab: int = TOKENIZER_VOCAB) -> list[int]:
    """`transformers` greedy generation, padded ids suppressed (specdec never emits them)."""
    width = model.config.vocab_size
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        suppress_tokens=list(range(vocab, width)) or None,
        pad_token_id=model.config.eos_token_id,
    )
    return out[0, len(prompt) :].tolist()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def is_near_tie(model, prefix: list[int], vocab: int = TOKENIZER_VOCAB, eps: float = 1e-5) -> bool:
    """Whether the reference's top-2 logits after `prefix` are within eps: batched and single-row
    numerics may legitimately pick different tokens there."""
    with torch.no_grad():
        logits = model(torch.tensor([prefix])).logits[0, -1, :vocab]
    top2 = logits.topk(2).values
    return bool(top2[0] - top2[1] < eps)


def assert_greedy_equal(reference_model, prompt, ours, theirs, vocab=TOKENIZER_VOCAB) -> bool:
    """Assert two greedy continuations agree token for token; a divergence is tolerated only at an
    exact near-tie of the reference (returns False then, so the caller can count skips)."""
    i = first_divergence(ours, theirs)
    if i is None:
        return True
    if i < min(len(ours), len(theirs)) and is_near_tie(reference_model, prompt + theirs[:i], vocab):
        return False
    raise AssertionError(f"greedy outputs diverge at token {i}:\n ours   {ours}\n theirs {theirs}")


def chi_square_pvalue(observed, expected_probs, min_expected: float = 5.0) -> float:
    """Pearson χ² goodness of fit, merging (smallest first) bins whose expected count is below
    `min_expected` into one, so the χ² approximation holds."""
    import numpy as np
    from scipy.stats import chi2

    observed = np.asarray(observed, dtype=np.float64)
    probs = np.asarray(expected_probs, dtype=np.float64)
    n = observed.sum()
    expected = probs / probs.sum() * n
    assert observed[expected == 0].sum() == 0, "an outcome with probability 0 was observed"
    keep = expected >= min_expected
    obs = list(observed[keep])
    exp = list(expected[keep])
    if (~keep).any():
        obs.append(observed[~keep].sum())
        exp.append(expected[~keep].sum())
        if exp[-1] < min_expected and len(exp) > 1:  # fold a still-small remainder into the smallest bin
            i = int(np.argmin(exp[:-1]))
            exp[i] += exp.pop()
            obs[i] += obs.pop()
    obs, exp = np.array(obs), np.array(exp)
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(chi2.sf(stat, df=len(exp) - 1))


def synthetic_costs(
    draft: float, verify_base: float, verify_per_token: float, batches=(1, 2, 4, 8, 16), max_width=9
) -> Any:
    """A synthetic machine for the γ policy: a draft pass costs `draft` (growing slowly with batch),
    a target pass costs verify_base + verify_per_token * batch * width."""
    from specdec.costs import CostModel
    from specdec.timing import PassKind

    model = CostModel()
    for b in batches:
        model.set_baseline(PassKind.DRAFT, b, 1, draft * (1 + 0.05 * b))
        model.set_verify_baseline(
            b, {w: verify_base + verify_per_token * b * w for w in range(1, max_width + 1)}
        )
    return model


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ToolCallingEndpoint:
    """An OpenAI chat endpoint on loopback (`url`) whose every answer calls `get_weather` once per
    entry of `cities` (settable between calls), recording each request's body in `bodies`: the
    tools tests' remote tier. `close()` stops it."""

    def __init__(self, cities: list | None = None):
        import http.server
        import json
        import threading

        self.cities: list = list(cities or [])
        self.bodies: list = []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # the stdlib handler's name for it
                endpoint.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                calls = [
                    {"id": f"call_{i}", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}}
                    for i, c in enumerate(endpoint.cities)
                ]  # fmt: skip
                data = json.dumps({
                    "choices": [{"message": {"role": "assistant", "content": None, "tool_calls": calls},
                                 "finish_reason": "tool_calls"}],
                    "usage": {"prompt_tokens": 20, "completion_tokens": 9},
                }).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def serve_process(*args: str, timeout: float = 300.0) -> tuple[Any, list[str]]:
    """A `specdec serve ARGS` process, returned once it prints "serving on" (its stderr a pipe,
    unbuffered), with the lines it printed until then. AssertionError with them if it exits first
    or does not come up within `timeout` seconds."""
    import os
    import subprocess
    import sys
    import threading

    specdec = str(Path(sys.executable).parent / "specdec")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([specdec, "serve", *args], stderr=subprocess.PIPE, text=True, env=env)
    timer = threading.Timer(timeout, proc.kill)  # a server that hangs before serving still ends
    timer.start()
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "serving on" in line:
                return proc, lines
    finally:
        timer.cancel()
    proc.kill()
    raise AssertionError("the server never came up:\n" + "".join(lines))


def serve_in_thread(engine: Any, grace_period: float = 10.0, **config: Any) -> Any:
    """A BackgroundServer on a free loopback port, with metrics on another (`.config.metrics_port`);
    `config`: more ServerConfig fields (API keys, TLS, limits)."""
    from specdec.server.app import ServerConfig
    from specdec.server.background import BackgroundServer

    server_config = ServerConfig(
        host="127.0.0.1", port=0, metrics_port=free_port(), grace_period=grace_period, **config
    )
    return BackgroundServer(engine, server_config)


def grpc_stub(address: str, credentials: Any = None) -> Any:
    """A SpecDec stub on a channel to `address`: plaintext, or TLS with these channel credentials."""
    import grpc

    from specdec.v1 import specdec_pb2_grpc as pb_grpc

    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    return pb_grpc.SpecDecStub(channel)


def openai_client(server: Any, api_key: str = "unused") -> Any:
    """The official `openai` client on a `serve_in_thread` server's HTTP API. max_retries=0: the
    client retries 408/409/429/5xx by default, which would hide the statuses under test."""
    import openai

    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.config.http_port}/v1", api_key=api_key, max_retries=0
    )


def copy_checkout(repo: Path, dest: Path) -> Path:
    """A copy of a git checkout's files as a fresh clone would have them: the tracked ones and new
    ones git does not ignore (so uncommitted work is in it, and no build output or .venv)."""
    import shutil
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=repo, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        if (repo / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, dest / name)
    return dest


def scrape_metrics(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """A Prometheus endpoint's samples: series (with labels) -> value."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


class HostTensorCount(torch.overrides.TorchFunctionMode):
    """Counts, while active, what on a GPU would each be a copy from the host: a tensor moved to a
    device (`.to(device)`, `.cuda()`) or made from Python values (`torch.tensor`, `as_tensor`).
    The step's one upload (`specdec.staging`) is one `.to`; the tests and the step benchmark count
    the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.moves = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_device = name == "to" and any(
            isinstance(a, (torch.device, str)) for a in (*args[1:], kwargs.get("device"))
        )
        if to_device or name in ("tensor", "as_tensor", "cuda"):
            self.moves += 1
        return func(*args, **kwargs)


def int8_per_tensor_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """Int8LinearCPU's product with what its per-row scale replaces: one activation scale for the
    whole pass and one 8-bit digit (fbgemm's dynamic linear as is). The negative control of the
    batch-invariance tests: a row's numbers then depend on the rows beside it."""
    from specdec.kernels.int8_linear import unpack_weights

    rows = x.reshape(-1, layer.in_features).float()
    top = rows.abs().max().clamp(min=1e-30)
    codes = torch.round(rows * (127.0 / top))
    weights = unpack_weights(layer.packed)[: layer.out_features, : layer.in_features].float()
    y = (codes @ weights.t()) * (top / 127.0) * layer.wscale[: layer.out_features]
    if layer.bias is not None:
        y = y + layer.bias[: layer.out_features]
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)

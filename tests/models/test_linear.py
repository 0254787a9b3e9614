"""The few-row matmul of models.linear computes F.linear, at every row count and shape it sees."""

import pytest
import torch
import torch.nn.functional as F

from specdec.models.linear import FEW_ROWS, Linear, linear


@pytest.mark.parametrize("order", ["linear", "transposed"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_f_linear(rows, with_bias, order, monkeypatch):
    from specdec.models import linear as module

    monkeypatch.setattr(module, "FORCED", order)
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=g)
    bias = torch.randn(96, generator=g) if with_bias else None
    x = torch.randn(rows, 40, generator=g)
    torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_leading_dims_and_downstream_views():
    # [B, T, in] as the decoder passes it; the result must reshape and split like F.linear's.
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=g)
    x = torch.randn(2, 3, 16, generator=g)
    assert 6 in FEW_ROWS
    out = linear(x, weight)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    q, _k = out.split([16, 8], dim=-1)
    torch.testing.assert_close(q.view(2, 3, 4, 4), F.linear(x, weight)[..., :16].view(2, 3, 4, 4))


def test_other_dtypes_take_f_linear():
    weight = torch.randn(8, 4, dtype=torch.bfloat16)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    assert torch.equal(linear(x, weight), F.linear(x, weight))


def test_module_keeps_nn_linear_parameters_and_gradients():
    layer = Linear(4, 6, bias=True)
    assert set(dict(layer.named_parameters())) == {"weight", "bias"}
    x = torch.randn(3, 4, requires_grad=True)
    layer(x).sum().backward()
    reference = torch.nn.Linear(4, 6)
    reference.load_state_dict(layer.state_dict())
    x_ref = x.detach().clone().requires_grad_(True)
    reference(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_each_shape_measures_its_order_once_and_the_environment_can_force_one(monkeypatch):
    """Which order is faster depends on the machine (models.linear): each (rows, out, in) is timed
    at its first product and keeps its choice; SPECDEC_FEW_ROW_MATMUL forces one, timing nothing.
    Either way the result is F.linear's."""
    from specdec.models import linear as module

    calls = []
    monkeypatch.setattr(module, "FORCED", None)  # the suite pins one order (tests/conftest.py)
    monkeypatch.setattr(module, "_transposed_faster", {})
    monkeypatch.setattr(module, "_measure", lambda rows, w: calls.append((rows, *w.shape)) or rows % 2 == 0)
    weight, x3, x4 = torch.randn(12, 8), torch.randn(3, 8), torch.randn(4, 8)
    for _ in range(3):
        torch.testing.assert_close(linear(x3, weight), F.linear(x3, weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x4, weight), F.linear(x4, weight), rtol=1e-5, atol=1e-5)
    assert calls == [(3, 12, 8), (4, 12, 8)]  # once per shape
    assert module._transposed_faster == {(3, 12, 8): False, (4, 12, 8): True}
    for forced in ("linear", "transposed"):
        monkeypatch.setattr(module, "FORCED", forced)
        assert module.transposed_is_faster(5, weight) is (forced == "transposed")
        torch.testing.assert_close(linear(torch.ones(5, 8), weight), F.linear(torch.ones(5, 8), weight))
    assert len(calls) == 2  # forcing measured nothing


@pytest.mark.parametrize(
    "linear_cost,transposed_cost,chosen", [(2.0, 1.0, True), (1.0, 2.0, False), (1.0, 0.95, False)]
)
def test_the_measurement_takes_the_transposed_order_only_when_clearly_faster(
    monkeypatch, linear_cost, transposed_cost, chosen
):
    """_measure on a fake clock that each product advances by its cost: the transposed order is
    taken when it is more than 10% faster, never on a tie (F.linear is the default)."""
    from specdec.models import linear as module

    clock = [0.0]

    def costing(seconds):
        def product(*args, **kwargs):
            clock[0] += seconds

        return product

    monkeypatch.setattr(module.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(module.F, "linear", costing(linear_cost))
    monkeypatch.setattr(module.torch, "mm", costing(transposed_cost))
    assert module._measure(3, torch.zeros(4, 2)) is chosen

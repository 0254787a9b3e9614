"""The few-row matmul of models.linear computes F.linear, at every row count and shape it sees."""

import pytest
import torch
import torch.nn.functional as F

from specdec.models.linear import FEW_ROWS, Linear, linear


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_f_linear(rows, with_bias):
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

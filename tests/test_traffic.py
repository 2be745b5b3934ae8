"""The traffic model: exact byte counting on known ops, and the fused-op table."""

import torch

from transkd_fast import traffic
from transkd_fast.ops.attention import efficient_attention_reference
from transkd_fast.traffic import H100_BANDWIDTH, count_bytes, tensor_bytes


def test_counts_inputs_and_outputs_of_an_elementwise_op():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    total, recs = count_bytes(lambda: torch.add(a, b))
    assert [r.name for r in recs] == ["aten.add.Tensor"]
    assert total == 3 * 15 * 4


def test_matmul_and_dtypes():
    a = torch.randn(4, 8, dtype=torch.float16)
    b = torch.randn(8, 3, dtype=torch.float16)
    total, recs = count_bytes(lambda: a @ b)
    assert [r.name for r in recs] == ["aten.mm.default"]
    assert total == (32 + 24 + 12) * 2


def test_views_are_free_and_inplace_is_read_plus_write():
    a, b = torch.randn(6, 7), torch.randn(6, 7)
    total, recs = count_bytes(lambda: a.t().reshape(7, 6).unsqueeze(0).expand(3, 7, 6))
    assert total == 0 and recs == []
    total, recs = count_bytes(lambda: a.add_(b))
    assert [r.name for r in recs] == ["aten.add_.Tensor"] and total == 3 * 42 * 4


def test_broadcast_dimensions_count_once():
    x = torch.randn(5, 1).expand(5, 9)
    assert tensor_bytes(x) == 5 * 4
    assert tensor_bytes(torch.empty(0, 3)) == 0
    total, _ = count_bytes(lambda: x * 2.0)  # reads 5 distinct values, writes 45
    assert total == (5 + 45) * 4


def test_only_filter_charges_selected_ops_but_runs_all():
    a = torch.randn(10)
    total, recs = count_bytes(lambda: (a * 2).sum(), only=lambda n: n.startswith("aten.sum"))
    assert [r.name for r in recs] == ["aten.sum.default"] and total == 10 * 4 + 4


def test_backward_is_counted_under_the_mode():
    x = torch.randn(4, 4, requires_grad=True)
    g = torch.randn(4, 4)
    fwd, _ = count_bytes(lambda: x * 3.0)
    both, recs = count_bytes(lambda: (x * 3.0).backward(g))
    names = [r.name for r in recs]
    assert "aten.mul.Tensor" in names and both > fwd


def test_attention_case_matches_the_analytic_bytes():
    B, N, Nkv, H, D = 2, 64, 16, 2, 8
    case = traffic.TrafficCase(
        "efficient_attention", "tiny",
        lambda: tuple(torch.randn(B, n, H, D).requires_grad_() for n in (N, Nkv, Nkv)),
        efficient_attention_reference,
        lambda q, k, v: torch.ops.transkd_fast.efficient_attention(q, k, v, D ** -0.5, "triton"))
    rf, ff, rb, fb = traffic.measure(case)
    q, kv, out, lse = B * N * H * D * 4, B * Nkv * H * D * 4, B * N * H * D * 4, B * H * N * 4
    assert ff == q + 2 * kv + out + lse
    # backward op: reads grad_out, q, k, v, out, lse; writes dq, dk, dv
    assert fb == ff + (out + q + 2 * kv + out + lse) + (q + 2 * kv)


def test_table_covers_the_fused_ops_and_fused_moves_less():
    rows = traffic.traffic_table()
    ops = {r["op"] for r in rows}
    assert {"efficient_attention", "selective_pool", "selective_fuse", "kd_kl_div", "hcl_loss", "weighted_mse"} <= ops
    for r in rows:
        # weighted_mse fuses launches, not bytes: aten's mse_loss already reads each pair once.
        less = (lambda a, b: a <= b) if r["op"] == "weighted_mse" else (lambda a, b: a < b)
        assert 0 < r["fused_fwd"] and less(r["fused_fwd"], r["ref_fwd"]), r
        if r["ref_fwdbwd"] is not None:
            assert 0 < r["fused_fwdbwd"] and less(r["fused_fwdbwd"], r["ref_fwdbwd"]), r
        assert abs(r["ref_fwd_us_h100_modeled"] - r["ref_fwd"] / H100_BANDWIDTH * 1e6) < 1e-9
    text = traffic.markdown(rows)
    assert "MODELED" in text and text.count("\n| ") == len(rows) + 1


def test_cli_report_traffic(capsys, tmp_path):
    import json

    from transkd_fast.cli import main

    assert main(["report", "--traffic", "--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "MODELED" in out and "| efficient_attention |" in out
    rows = json.loads((tmp_path / "t.json").read_text())["traffic"]
    assert rows and all(r["fused_fwd"] > 0 for r in rows)

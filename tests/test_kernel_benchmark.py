"""benchmarks/kernel_gpu.py without a GPU: its checks and accounting, on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

pytest.importorskip("triton", reason="triton not installed (pip install 'mla-fx[triton]')")

from mla_fx.benchmarks import kernel_gpu  # noqa: E402
from mla_fx.kernels.latent_attention import bytes_moved  # noqa: E402


def fixed_timer(seconds):
    def timer(fn):
        fn()
        return seconds
    return timer


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the benchmark's checks")
def test_case_checks_the_kernel_and_sdpa_and_accounts_bytes():
    nbytes = bytes_moved(2, 16, 45, kernel_gpu.D_C, kernel_gpu.D_R, 4)
    copy_bps = nbytes / 1e-6 / 0.9  # so that the kernel, at 1 us, runs at 90% of it
    rows = kernel_gpu.measure_case(2, 45, 16, torch.float32, ((16, 16, 4), (8, 16, 4)), copy_bps,
                                   timer=fixed_timer(1e-6), device="cpu")
    assert [r["config"] for r in rows] == ["h16/n16/w4", "h8/n16/w4"]
    for r in rows:
        assert r["kernel_rel_err"] <= 1e-5 and r["sdpa_rel_err"] <= 1e-5
        assert r["kernel_gbs"] == pytest.approx(nbytes / 1e-6 / 1e9)
        assert r["of_copy"] == pytest.approx(0.9)
        assert r["sdpa_over_kernel"] == pytest.approx(1.0)
    assert kernel_gpu.summary(rows, copy_bps) == [
        f"- batch 2, cache 45: best h16/n16/w4 {nbytes / 1e-6 / 1e9:.0f} GB/s = 90% of copy "
        f"({copy_bps / 1e9:.0f} GB/s; aim > 80%: met); SDPA 1.0x slower"]


def test_a_wrong_kernel_is_not_timed(monkeypatch):
    import mla_fx.kernels.latent_attention as la

    real = la.latent_attention_decode
    monkeypatch.setattr(la, "latent_attention_decode", lambda *a, **k: real(*a, **k) * 1.1)
    rows = kernel_gpu.measure_case(1, 20, 16, torch.float32, ((16, 16, 4),), 50e9, fixed_timer(1e-3), "cpu")
    assert rows[0]["kernel_rel_err"] == pytest.approx(0.1, rel=1e-3)
    assert rows[0]["kernel_ms"] != rows[0]["kernel_ms"]  # NaN: not timed
    assert kernel_gpu.summary(rows, 1e9) == ["- batch 1, cache 20: no config passed the correctness check"]


def test_copy_bandwidth_counts_read_and_write():
    assert kernel_gpu.copy_bandwidth(fixed_timer(0.5), "cpu", nbytes=2**20) == 2 * 2**20 / 0.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_without_a_gpu_it_says_so(capsys, tmp_path):
    assert kernel_gpu.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())

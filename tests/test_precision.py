"""Mixed precision: where bf16 autocast is on, that the ELBO's terms stay fp32 under it, and that it moves
the loss only by bf16's rounding.

The bf16 path runs on any CPU: where the CPU lacks AVX512-BF16 and AMX, the tests force `autocast` on and
PyTorch emulates bf16, so the same code is checked everywhere (only slower). Last, the other CPU setting
training makes: glibc keeping freed memory for the next step (its effect, page faults per step, is measured
in benchmarks/README.md: counted in a test it varied with what the heap held before).
"""

from __future__ import annotations

import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mvae_course import device as device_module
from mvae_course.config import FUSIONS, preset
from mvae_course.data.text import EOS, PAD, UNK
from mvae_course.device import amp_dtype, autocast, cpu_has_bf16
from mvae_course.models import MultimodalVAE

CPU = torch.device("cpu")
VOCAB = 24


def tiny_model(fusion: str) -> MultimodalVAE:
    config = preset("tiny").model
    config.vocab_size, config.fusion = VOCAB, fusion
    torch.manual_seed(0)
    return MultimodalVAE(config)


def batch(b: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images in [0, 1] and captions that follow the batch contract (content ids, EOS, PAD)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (b,), generator=g)
    text = torch.randint(UNK + 1, VOCAB, (b, int(lengths.max())), generator=g)
    for i, n in enumerate(lengths.tolist()):
        text[i, n - 1], text[i, n:] = EOS, PAD
    return {"image": torch.rand(b, 3, 32, 32, generator=g), "text": text, "lengths": lengths}


@pytest.fixture
def bf16_cpu(monkeypatch):
    """`autocast` on the CPU as on one with bf16 arithmetic (emulated by PyTorch where it has none)."""
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)


def test_cpu_has_bf16_reads_the_flags_of_proc_cpuinfo(tmp_path):
    def cpuinfo(flags: str):
        path = tmp_path / f"cpuinfo-{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 {flags}\n\n")
        return path

    assert cpu_has_bf16(cpuinfo("avx512f avx512_bf16"))
    assert cpu_has_bf16(cpuinfo("amx_tile amx_bf16"))
    assert not cpu_has_bf16(cpuinfo("avx2 avx512f avx512bw"))  # AVX-512 alone: bf16 would be emulated
    assert not cpu_has_bf16(tmp_path / "missing")  # no /proc/cpuinfo (macOS, Windows): fp32


def test_autocast_turns_bf16_on_only_where_the_device_computes_it(monkeypatch):
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    for native in (False, True):
        monkeypatch.setattr(device_module, "cpu_has_bf16", lambda native=native: native)
        expected = torch.bfloat16 if native else torch.float32
        assert amp_dtype(CPU, True) == expected
        with autocast(CPU, True):
            assert (a @ b).dtype == expected
        with autocast(CPU, False):  # train.amp = False: fp32 whatever the CPU
            assert (a @ b).dtype == torch.float32
    assert amp_dtype(torch.device("cuda"), True) == torch.bfloat16  # (decided without a GPU being present)
    assert amp_dtype(torch.device("cuda"), False) == torch.float32


@pytest.mark.parametrize("fusion", FUSIONS)
def test_loss_terms_are_reduced_in_fp32_under_bf16_autocast(fusion, bf16_cpu):
    model, data = tiny_model(fusion), batch()
    n = data["image"].shape[0]
    # What the decoders read: z, or (z, w) for MMVAE+'s private latents.
    u_image = torch.randn(n, model.image_decoder.from_z.in_features)
    u_text = torch.randn(n, model.config.z_dim + (model.config.private_dim if fusion == "mmvaeplus" else 0))
    with autocast(CPU, True):
        assert model.image_decoder.from_z(u_image).dtype == torch.bfloat16
        mu, logvar = model.image_encoder(data["image"])
        mu_text, logvar_text = model.text_encoder(data["text"], data["lengths"])
        logits = model.image_decoder(u_image)
        log_p_text = model.text_decoder.log_likelihood(u_text, data["text"], data["lengths"])
        terms = model(data, 0.5)
    # What leaves a network is fp32, so every sum over pixels, tokens and latent dimensions is too.
    for tensor in (mu, logvar, mu_text, logvar_text, logits, log_p_text, *terms.values()):
        assert tensor.dtype == torch.float32
    terms["loss"].backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_bf16_loss_is_the_fp32_loss_up_to_rounding(fusion, bf16_cpu):
    model, data = tiny_model(fusion), batch(16, seed=1)
    terms = {}
    for amp in (False, True):
        torch.manual_seed(2)  # the same reparameterisation noise for both
        with autocast(CPU, amp):
            terms[amp] = model(data, 1.0)
    for name in ("loss", "elbo", "rec_image", "rec_text", "kl"):
        fp32, bf16 = terms[False][name], terms[True][name]
        torch.testing.assert_close(bf16, fp32, rtol=1e-2, atol=0.05, msg=f"{fusion} {name}")
    assert terms[True]["loss"] != terms[False]["loss"]  # bf16 really ran


def test_cpu_name_reads_proc_cpuinfo_and_falls_back_to_platform(monkeypatch):
    from mvae_course import reference

    # machine_description also asks cpu_has_bf16, which reads cpuinfo once per process and keeps the answer
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(device_module, "cpuinfo", lambda: {"model name": "Test CPU 9000"})
    assert device_module.cpu_name() == reference.machine()["cpu"] == "Test CPU 9000"
    assert device_module.machine_description().startswith("Test CPU 9000, ")
    monkeypatch.setattr(device_module, "cpuinfo", lambda: {})
    monkeypatch.setattr(device_module.platform, "processor", lambda: "")
    monkeypatch.setattr(device_module.platform, "machine", lambda: "x86_64")
    assert device_module.cpu_name() == "x86_64"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory sets glibc's malloc")
def test_glibc_takes_the_thresholds_keep_freed_memory_sets():
    # mallopt returns 0 for a value it refuses (an mmap threshold above its largest, 32 MiB): a fresh process
    code = "from mvae_course.device import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"]


def test_keep_freed_memory_sets_both_thresholds_and_leaves_a_libc_without_mallopt_alone(monkeypatch):
    calls = []

    def mallopt(param: int, value: int) -> int:  # a function, as ctypes gives: it takes argtypes
        calls.append((param, value))
        return 1

    keep = device_module.keep_freed_memory.__wrapped__  # not the per-process cached answer
    monkeypatch.setattr(device_module.ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=mallopt))
    assert keep() is True
    # both: setting the trim threshold alone turns off glibc's adaptive mmap threshold (benchmarks/README.md)
    mmap, trim = device_module.M_MMAP_THRESHOLD, device_module.M_TRIM_THRESHOLD
    assert calls == [(mmap, 32 * 2**20), (trim, 256 * 2**20)]
    monkeypatch.setattr(device_module.ctypes, "CDLL", lambda name: object())  # macOS: no mallopt
    assert keep() is False

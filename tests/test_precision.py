"""Which autocast dtype ``amp=auto`` picks, through the real decision function, for the CPUs our users run on."""

from __future__ import annotations

import pytest
import torch

from unet3d_dist.precision import read_cpu_flags, resolve_amp

# /proc/cpuinfo's flags of the 2-core AMD EPYC (Zen 4) our AVX-512 CI machines have; bf16 steps run 1.4x fp32 there.
ZEN4 = """
    fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall
    nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid
    tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes
    xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw
    topoext vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap
    avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16
    clzero xsaveerptr arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg
    avx512_vpopcntdq rdpid fsrm
""".split()
# The AVX2 EPYC machines have no AVX-512 at all; there one bf16 step took minutes against 1.4 s in fp32.
AVX2 = [flag for flag in ZEN4 if not flag.startswith("avx512")]
SKYLAKE_SP = [*AVX2, "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"]  # AVX-512 but no bf16 instructions
SAPPHIRE_RAPIDS = [*SKYLAKE_SP, "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"]
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "flags, expected",
    [(ZEN4, torch.bfloat16), (SAPPHIRE_RAPIDS, torch.bfloat16), (AVX2, None), (SKYLAKE_SP, None), ([], None)],
    ids=["zen4", "sapphire-rapids", "avx2", "skylake-sp", "no-flags"],
)
def test_auto_is_bf16_only_on_cpus_with_bf16_dot_product_instructions(flags, expected):
    assert resolve_amp("auto", CPU, cpu_flags=flags) is expected


def test_training_crops_too_small_for_correct_bf16_weight_gradients_train_in_fp32():
    assert resolve_amp("auto", CPU, cpu_flags=ZEN4, crop=(16, 16, 8)) is None  # the tests' tiny crop
    assert resolve_amp("auto", CPU, cpu_flags=ZEN4, crop=(64, 64, 48)) is torch.bfloat16  # the demo's
    assert resolve_amp("bf16", CPU, cpu_flags=ZEN4, crop=(16, 16, 8)) is torch.bfloat16  # asked for


def test_an_explicit_mode_is_kept_whatever_the_cpu():
    assert resolve_amp("off", CPU, cpu_flags=ZEN4) is None
    assert resolve_amp("bf16", CPU, cpu_flags=AVX2) is torch.bfloat16
    assert resolve_amp("fp16", CPU, cpu_flags=AVX2) is torch.float16


def test_this_machine_is_decided_from_its_own_proc_cpuinfo(tmp_path):
    flags = read_cpu_flags()
    assert "sse2" in flags  # the file was found and parsed (every x86-64 CPU has SSE2)
    has_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert resolve_amp("auto", CPU) is (torch.bfloat16 if has_bf16 else None)
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert read_cpu_flags(tmp_path / "cpuinfo") == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert read_cpu_flags(tmp_path / "missing") == frozenset()

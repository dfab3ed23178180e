"""The bfloat16 warning: when the CPU computing lacks the extensions bfloat16 needs."""

import warnings

import pytest

from jaxcap import configs
from jaxcap.models.captioner import build_captioner
from jaxcap.models import precision

# /proc/cpuinfo as Linux writes it for two processors (trimmed), with the flags of the
# 2-core AMD EPYC this was measured on (AVX2, no AVX-512) or of an Intel Xeon with AMX.
AVX2_FLAGS = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2"
XEON_FLAGS = AVX2_FLAGS + " avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"


def cpuinfo(tmp_path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text("".join(f"processor\t: {n}\nvendor_id\t: AuthenticAMD\n"
                            f"model name\t: AMD EPYC\nflags\t\t: {flags}\n\n" for n in range(2)))
    return str(path)


def test_cpu_flags_are_read_from_cpuinfo_or_unknown(tmp_path):
    flags = precision.cpu_flags(cpuinfo(tmp_path, AVX2_FLAGS))
    assert "avx2" in flags and "fma" in flags and "avx512_bf16" not in flags
    assert precision.cpu_flags(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("dtype,flags,warns", [
    ("bfloat16", AVX2_FLAGS, True),
    ("bfloat16", XEON_FLAGS, False),
    ("bfloat16", AVX2_FLAGS + " avx512_bf16", False),  # AVX-512 BF16 without AMX (Zen 4)
    ("float32", AVX2_FLAGS, False),
])
def test_bfloat16_warns_only_on_a_cpu_without_its_extensions(tmp_path, dtype, flags, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precision.warn_if_bfloat16_is_slow(dtype, cpuinfo(tmp_path, flags))
    messages = [str(w.message) for w in caught]
    assert len(messages) == warns
    if warns:
        assert "neither AVX-512 BF16 nor AMX" in messages[0]


def test_unknown_flags_do_not_warn(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precision.warn_if_bfloat16_is_slow("bfloat16", str(tmp_path / "absent"))
    assert not caught


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_bfloat16_model_warns_where_the_cpu_lacks_the_extensions(monkeypatch, dtype):
    """Every command builds its model with ``build_captioner``: training, captioning,
    evaluation and the service all warn from there."""
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo: frozenset(AVX2_FLAGS.split()))
    config = configs.load("tiny")
    config.dtype = dtype
    metadata = dict(architecture="resnet", depth=18, variant="v1.5", preprocessing="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_captioner(config, 30, metadata)
    messages = [str(w.message) for w in caught if "slower than float32" in str(w.message)]
    assert len(messages) == (dtype == "bfloat16")

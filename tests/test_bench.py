"""The IF GPU benchmark: its architectures have the published sizes, and it runs end to end on tiny models
on a CPU, where mirage and the plain reference loop make the same anagram."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import if_arch  # noqa: E402


@pytest.mark.parametrize("config, kind, published", [
    (if_arch.PUBLISHED.stage_1, "unet", 4.30e9),  # IF-I-XL
    (if_arch.PUBLISHED.stage_2, "unet", 1.19e9),  # IF-II-L
    (if_arch.PUBLISHED.t5, "t5", 4.76e9),  # T5 v1.1 XXL encoder
])
def test_architectures_have_the_published_sizes(config, kind, published):
    assert abs(if_arch.parameters(config, kind) - published) / published < 0.005


def test_the_narrow_architecture_is_the_published_structure_at_other_widths():
    """bench/fused_compile.py's stand-in for the published UNets: what dynamo traces depends on everything but the
    widths, which must leave more than one channel a group, as the published ones do."""
    widths = {"sample_size", "block_out_channels", "cross_attention_dim", "encoder_hid_dim", "attention_head_dim",
              "addition_embed_type_num_heads"}
    for narrow, published in ((if_arch.NARROW.stage_1, if_arch.PUBLISHED.stage_1),
                              (if_arch.NARROW.stage_2, if_arch.PUBLISHED.stage_2)):
        assert narrow.keys() == published.keys()
        assert {k: v for k, v in narrow.items() if k not in widths} == \
            {k: v for k, v in published.items() if k not in widths}
        assert min(narrow["block_out_channels"]) > narrow.get("norm_num_groups", 32)


def test_tiny_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(BENCH / "if_gpu.py"), "--tiny", "--root", str(tmp_path / "models"),
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FAILED" not in done.stdout, done.stdout
    figures = json.loads(out.read_text())
    for key in ("build_s", "t5_s", "load_I_s", "load_II_s", "unet_I_b4_mirage_NHWC", "unet_II_b2_mirage_NCHW",
                "unet_I_b2_eager_NCHW", "anagram", "candidates", "pipeline", "targets"):
        assert key in figures, key
    assert figures["unet_I_b4_mirage_NHWC"]["tflop_per_call"] > 0
    assert figures["anagram_max_diff"] < 1e-3  # the same work, in fp32: the reference loop agrees with mirage
    (run,) = figures["pipeline"]
    assert "error" not in run and run["finite"] and run["plans"]["stage_I"] == "cpu"
    assert "2-view anagram 64->256" in done.stdout and "targets" in done.stdout
    for folder in ("IF-I-tiny/unet", "IF-I-tiny/text_encoder"):  # saved in the hub layout, fp16 variants
        assert any(".fp16" in f.name for f in (tmp_path / "models" / folder).iterdir())
    assert (tmp_path / "models" / "IF-I-tiny/text_encoder/model.safetensors.index.fp16.json").is_file()


def test_tiny_profile_runs_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "if_profile.py"), "--tiny", "--root", str(tmp_path / "models")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in ("stage I  batch  4 mirage:", "stage II batch  2 mirage:", "T5 gpu : load", "done in"):
        assert line in done.stdout, done.stdout

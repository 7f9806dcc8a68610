"""Config loading: YAML + --set into the job's dataclasses; every error is one line naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest

from trellis.launcher.config_loader import ConfigError, dump_yaml, load_config
from trellis.launcher.jobs.pretrain.config import PretrainJobConfig

ROOT = Path(__file__).resolve().parents[1]
TRELLIS = Path(sys.executable).parent / "trellis"


def test_yaml_and_overrides_fill_nested_dataclasses(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("model:\n  preset: gpt-tiny\n  n_layer: 3\noptim:\n  lr: 1e-3\n")
    cfg = load_config(PretrainJobConfig, f, ["parallel.zero_stage=2", "train.steps=7",
                                             "optim.betas=[0.8, 0.9]"])
    assert cfg.model.n_layer == 3            # explicit key beats the preset
    assert cfg.model.d_model == 64           # from the gpt-tiny preset
    assert cfg.optim.lr == pytest.approx(1e-3)   # YAML reads 1e-3 as a string; coerced
    assert cfg.parallel.zero_stage == 2 and cfg.train.steps == 7
    assert cfg.optim.betas == [0.8, 0.9]
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_config(PretrainJobConfig, again) == cfg


@pytest.mark.parametrize("override, needle", [
    ("model.n_layers=3", "unknown config key 'model.n_layers'"),
    ("nosuch=1", "unknown config key 'nosuch'"),
    ("model.n_layer=three", "config key 'model.n_layer': expected an integer"),
    ("parallel.offload_params=maybe", "config key 'parallel.offload_params': expected true/false"),
    ("parallel.zero_stage=4", "config key 'parallel.zero_stage': 4 is out of range (allowed: [0, 3])"),
    ("parallel.precision=fp8", "config key 'parallel.precision': 'fp8' is not allowed (allowed: fp32, bf16, fp16, auto)"),
    ("model.preset=gpt9", "config key 'model.preset': unknown preset 'gpt9'"),
    ("train.objective=mlm", "needs model.arch=bert"),
])
def test_bad_config_is_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(PretrainJobConfig, None, [override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainJobConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML") as e:
        load_config(PretrainJobConfig, bad)
    assert str(bad) in str(e.value)


def test_cli_help_lists_subcommands():
    out = subprocess.run([str(TRELLIS), "--help"], capture_output=True, text=True, check=True)
    for name in ("pretrain", "ingest", "export"):
        assert name in out.stdout


@pytest.mark.parametrize("override, key", [
    ("model.colour=red", "model.colour"),
    ("optim.lr=fast", "optim.lr"),
    ("parallel.zero_stage=9", "parallel.zero_stage"),
])
def test_cli_config_error_exits_2_with_one_line(override, key):
    proc = subprocess.run([str(TRELLIS), "pretrain", "--local", "--set", override],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr


def test_a_config_file_names_its_job(tmp_path):
    """`job:` (what `trellis submit` reads) is not a config key; a file for another job is
    refused in one line."""
    f = tmp_path / "p.yaml"
    f.write_text("job: pretrain\ntrain:\n  steps: 7\n")
    assert load_config(PretrainJobConfig, f, job="pretrain").train.steps == 7
    assert load_config(PretrainJobConfig, f).train.steps == 7
    with pytest.raises(ConfigError, match=r"it is for `trellis pretrain` \(key 'job'\), not `trellis sft`"):
        load_config(PretrainJobConfig, f, job="sft")

"""Loading never runs code from a file (issue "Trust"): DeepSpeed's own loads (resume through
Engine.load, export through zero_to_fp32) are forced to torch.load(weights_only=True) with a
short allow-list; a planted pickle payload is refused with one CheckpointError line naming the
file, and the payload's marker file is never created. HF directories with only a pickled
pytorch_model.bin are refused the same way."""
import dataclasses
import json
import pathlib
import shutil

import pytest
import torch

from trellis.parallel import safe_load
from trellis.parallel.checkpoint import CheckpointError

VOCAB = 32


class Payload:
    """Unpickling this calls Path.touch(marker): what a planted checkpoint would run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def plant(path: pathlib.Path, marker: pathlib.Path, allow=()) -> None:
    """Rewrite one of our own files (read back weights_only) with a payload added."""
    obj = safe_load.load_file(path, allow=allow)
    obj["payload"] = Payload(marker)
    torch.save(obj, path)


def assert_refused(e: pytest.ExceptionInfo, file: pathlib.Path, marker: pathlib.Path) -> None:
    msg = str(e.value)
    assert str(file) in msg and "\n" not in msg, msg
    assert not marker.exists(), "the payload ran"


@pytest.fixture
def bad_file(tmp_path):
    """A torch.save'd dict with a live payload (proven live: an unsafe load runs it)."""
    marker, f = tmp_path / "pwned", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": Payload(marker)}, f)
    torch.load(f, weights_only=False)  # what DeepSpeed did before: the payload runs
    assert marker.exists()
    marker.unlink()
    return f, marker


# ---- the mechanism (no DeepSpeed import: the allow-list is stubbed out) --------------------
@pytest.fixture
def no_deepspeed(monkeypatch):
    monkeypatch.setattr(safe_load, "allowed_globals", lambda: ())


def test_load_file_refuses_payload_with_one_line(bad_file):
    f, marker = bad_file
    with pytest.raises(CheckpointError, match="nothing in it was run") as e:
        safe_load.load_file(f)
    assert_refused(e, f, marker)


def test_safe_torch_load_forces_weights_only_then_restores(bad_file, no_deepspeed, tmp_path):
    f, marker = bad_file
    good = tmp_path / "good.pt"
    torch.save({"step": 3, "w": torch.arange(3)}, good)
    original = torch.load
    with pytest.raises(CheckpointError) as e:
        with safe_load.safe_torch_load():
            assert torch.load(good, weights_only=False)["step"] == 3  # plain files still load
            torch.load(f, map_location="cpu", weights_only=False)  # as DeepSpeed calls it
    assert_refused(e, f, marker)
    assert torch.load is original and torch.serialization.load is original


def test_swallowed_or_rewrapped_refusal_still_raises(bad_file, no_deepspeed):
    f, marker = bad_file
    with pytest.raises(CheckpointError) as e:
        with safe_load.safe_torch_load():
            try:
                torch.load(f, weights_only=False)
            except Exception:
                pass  # a caller that carries on half-loaded
    assert_refused(e, f, marker)
    with pytest.raises(CheckpointError) as e:
        with safe_load.safe_torch_load():
            try:
                torch.load(f, weights_only=False)
            except Exception as inner:
                raise KeyError("something else") from inner
    assert_refused(e, f, marker)


def test_static_scan_refuses_payload_and_passes_plain_files(bad_file, tmp_path):
    f, marker = bad_file
    good = tmp_path / "good.pt"
    torch.save({"step": 3, "w": torch.arange(3), "shapes": [torch.Size([2, 3])]}, good)
    with pytest.raises(CheckpointError, match="it holds builtins.getattr") as e:
        safe_load.check_files([good, f])
    assert_refused(e, f, marker)
    safe_load.check_files([good])


def test_unreadable_file_names_it(tmp_path):
    f = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"w": torch.ones(100)}, f)
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="unreadable") as e:
        safe_load.load_file(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


# ---- Hugging Face directories: safetensors only ---------------------------------------------
def _hf_dir(path: pathlib.Path) -> pathlib.Path:
    from trellis.model import ModelConfig
    from trellis.model.hf import hf_config
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=16, max_seq_len=16)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf_config(cfg)))
    return path


def test_hf_dir_with_only_pytorch_model_bin_is_refused(tmp_path):
    from trellis.launcher.weights import materialize
    from trellis.model.hf import UnsafeWeightsError, load_hf_pretrained
    src, marker = _hf_dir(tmp_path / "hf"), tmp_path / "pwned"
    torch.save({"transformer.wte.weight": torch.zeros(VOCAB, 16), "x": Payload(marker)},
               src / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="pytorch_model.bin"):
        load_hf_pretrained(src)
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as e:  # init_from, teacher
        materialize(src, tmp_path / "init")
    assert_refused(e, src, marker)
    assert not (tmp_path / "init").exists()


def test_hf_index_must_name_safetensors_shards(tmp_path):
    from trellis.model.hf import load_hf_pretrained
    src = _hf_dir(tmp_path / "hf")
    torch.save({"x": Payload(tmp_path / "pwned")}, src / "pytorch_model-00001-of-00001.bin")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"transformer.wte.weight": "pytorch_model-00001-of-00001.bin"}}))
    with pytest.raises(ValueError, match="not a .safetensors file"):
        load_hf_pretrained(src)
    (src / "model.safetensors").write_bytes((src / "pytorch_model-00001-of-00001.bin").read_bytes())
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_hf_pretrained(src)
    assert not (tmp_path / "pwned").exists()


# ---- real DeepSpeed checkpoints ---------------------------------------------------------------
@pytest.mark.integration
def test_allow_list_is_what_deepspeed_stores(tmp_path):
    """Each allowed type loads; the same file without the allow-list is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    assert set(safe_load.allowed_globals()) == {ZeroStageEnum, fragment_address, LossScaler,
                                                DynamicLossScaler}
    f = tmp_path / "optim_states.pt"
    dyn = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1,
                            delayed_shift=2, consecutive_hysteresis=False, dtype=torch.half)
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1), "dyn": dyn,
                "param_slice_mappings": [{"w": fragment_address(numel=4, start=8)}]}, f)
    with pytest.raises(CheckpointError, match="not a tensor or an allowed DeepSpeed type"):
        safe_load.load_file(f)
    with safe_load.safe_torch_load():
        sd = torch.load(f, map_location="cpu", weights_only=False)
    assert sd["zero_stage"] is ZeroStageEnum.weights and sd["loss_scaler"].cur_scale == 1
    assert vars(sd["dyn"]) == vars(dyn)
    assert sd["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=8)


def _model(seed: int):
    from trellis.model import GPT, ModelConfig
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=16, max_seq_len=16)
    return GPT(cfg), cfg


def _engine(stage: int, seed: int):
    from trellis.parallel.config import OptimConfig, ParallelConfig
    from trellis.parallel.engine import Engine
    model, cfg = _model(seed)
    return Engine(model, OptimConfig(lr=1e-2, warmup_steps=1),
                  ParallelConfig(zero_stage=stage, micro_batch_size=2, precision="fp32"),
                  total_steps=4), cfg  # fp32: engine, checkpoint and export compared exactly


@pytest.fixture(scope="module", params=[0, 1, 3], ids=lambda s: f"zero{s}")
def run(request, tmp_path_factory):
    """A run directory with one checkpoint after 2 steps, the trained weights, and a second
    engine (other weights) to resume into."""
    from trellis.launcher.weights import write_run_model
    from trellis.parallel.checkpoint import save_checkpoint
    stage = request.param
    run_dir = tmp_path_factory.mktemp(f"run_zero{stage}")
    engine, cfg = _engine(stage, 0)
    for _ in range(2):
        x = torch.randint(0, VOCAB, (2, 9))
        logits = engine(x[:, :-1])
        engine.backward(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                          x[:, 1:].reshape(-1)))
        engine.step()
    write_run_model(run_dir, dataclasses.asdict(cfg), "lm")
    path = save_checkpoint(run_dir, 2, {"model": engine})
    trained = engine.consolidated_state_dict()
    other, _ = _engine(stage, 1)
    return {"stage": stage, "dir": run_dir, "path": path, "trained": trained, "other": other}


def _same(a: dict, b: dict) -> None:
    assert set(b) <= set(a) and len(b) > 0
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.integration
def test_clean_resume_consolidate_and_export_agree(run, tmp_path):
    from trellis.launcher.jobs.export.driver import export
    from trellis.parallel.checkpoint import load_checkpoint
    from trellis.parallel.engine import Engine
    restored = load_checkpoint(run["path"], {"model": run["other"]})
    assert restored.step == 2 and run["other"].global_step == 2
    _same(run["trained"], run["other"].consolidated_state_dict())
    _same(run["trained"], Engine.consolidate(run["path"] / "model"))
    out = export(run["dir"], tmp_path / "hf", fmt="trellis")
    from safetensors.torch import load_file
    _same(run["trained"], load_file(str(out / "model.safetensors")))


def _targets(path: pathlib.Path) -> list[pathlib.Path]:
    engine_dir = path / "model" / "engine"
    return sorted(engine_dir.glob("*model_states.pt")) + sorted(engine_dir.glob("*optim_states.pt"))


@pytest.mark.integration
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "forced-load-only"])
def test_planted_payload_is_refused_by_resume_and_export(run, scan, tmp_path, capsys,
                                                         monkeypatch):
    """With the static scan (the normal path) and without it: DeepSpeed's own torch.load calls,
    forced to weights_only, refuse the payload by themselves."""
    if not scan:
        monkeypatch.setattr(safe_load, "check_files", lambda files: None)
    from trellis.launcher.cli import main
    from trellis.launcher.weights import materialize
    from trellis.parallel.checkpoint import load_checkpoint
    from trellis.parallel.engine import Engine
    targets = _targets(run["path"])
    kinds = {t.name.rsplit("_", 2)[-2] for t in targets}
    assert kinds == ({"model"} if run["stage"] == 0 else {"model", "optim"}), targets
    for target in targets:
        marker = tmp_path / f"pwned_{target.stem}"
        backup = tmp_path / target.name
        shutil.copy2(target, backup)
        plant(target, marker, allow=safe_load.allowed_globals())
        try:
            with pytest.raises(CheckpointError) as e:  # resume
                load_checkpoint(run["path"], {"model": run["other"]})
            assert_refused(e, target, marker)
            with pytest.raises(CheckpointError) as e:  # consolidate
                Engine.consolidate(run["path"] / "model")
            assert_refused(e, target, marker)
            with pytest.raises(CheckpointError) as e:  # init_from / distillation teacher
                materialize(run["dir"], tmp_path / f"init_{target.stem}")
            assert_refused(e, target, marker)
            capsys.readouterr()
            out = tmp_path / f"hf_{target.stem}"
            assert main(["export", str(run["dir"]), "--out", str(out)]) == 1  # the CLI
            err = capsys.readouterr().err.strip().splitlines()[-1]  # after tqdm's bar
            assert err.startswith("trellis export: error: ") and str(target) in err, err
            assert not marker.exists() and not out.exists()
        finally:
            shutil.copy2(backup, target)


@pytest.mark.integration
def test_planted_rank_file_is_refused(run, tmp_path):
    from trellis.parallel.checkpoint import load_checkpoint
    target, marker = run["path"] / "rank_0.pt", tmp_path / "pwned"
    backup = tmp_path / target.name
    shutil.copy2(target, backup)
    plant(target, marker)
    try:
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(run["path"], {"model": run["other"]})
        assert_refused(e, target, marker)
    finally:
        shutil.copy2(backup, target)

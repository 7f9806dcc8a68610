"""`trellis pretrain`: prepare the data, then run the shared training loop (launcher/train_loop)
over PretrainWorker ranks: Ray actors, or one in-process worker with --local."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from trellis.launcher.config_loader import ConfigError, dump_yaml
from trellis.launcher.job_flags import add_run_arguments, cpu_defaults, print_result, resolve_config
from trellis.launcher.jobs.pretrain.config import PretrainJobConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)


def pretrain(cfg: PretrainJobConfig, local: bool = False,
             address: str | None = None) -> dict[str, Any]:
    """Prepare the data, train, and return the final metrics (step, loss, val_*, sample)."""
    from trellis.launcher.driver_loop import train_with_recovery

    return train_with_recovery(cfg, pretrain_spec(cfg), Path(cfg.run_dir), local=local,
                               address=address)


def is_done(cfg: Any) -> bool:
    """Does cfg.run_dir hold the complete checkpoint of the schedule's last step?"""
    from trellis.parallel.checkpoint import is_complete
    return is_complete(cfg.run_dir, cfg.train.steps)


def pretrain_spec(cfg: PretrainJobConfig) -> Any:
    """Prepare the run dir (data, tokenizer, teacher, config) and describe the workers."""
    if cfg.train.objective == "seq2seq":  # translation pairs, an encoder-decoder
        from trellis.launcher.jobs.pretrain.seq2seq import seq2seq_spec
        return seq2seq_spec(cfg)
    from trellis.launcher.jobs.pretrain.data import prepare_data
    from trellis.launcher.weights import materialize, write_run_model
    from trellis.launcher.driver_loop import LoopSpec
    from trellis.model.flops import flops_per_token

    cpu_defaults()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, run_dir)
    if cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than "
                          f"the tokenizer's vocabulary ({data.vocab_size}, {data.tokenizer_path})")
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    model_cfg, head = cfg.model, ("lm" if cfg.train.objective == "clm" else "mlm")
    kwargs = {"cfg": dataclasses.asdict(cfg), "data_dir": str(data.train_dir),
              "val_dir": str(data.val_dir) if data.val_dir else None, "run_dir": str(run_dir),
              "tokenizer_sha256": data.tokenizer_sha256}
    if cfg.train.objective == "distill":
        from trellis.model.distill import student_config
        from trellis.model.io import read_meta
        from trellis.model.config import ModelConfig
        teacher = materialize(cfg.distill.teacher, run_dir / "teacher")
        kwargs["teacher_dir"] = str(teacher)
        model_cfg = student_config(ModelConfig.from_saved(read_meta(teacher)["model"]), cfg.model.dropout)
    write_run_model(run_dir, dataclasses.asdict(model_cfg), head)
    return LoopSpec(role="pretrain", worker="trellis.launcher.jobs.pretrain.worker:PretrainWorker",
                    worker_kwargs=kwargs,
                    flops_per_token=flops_per_token(model_cfg, cfg.data.seq_len),
                    finish=_sampler(cfg, data) if cfg.model.arch == "gpt" else None)


def _sampler(cfg: PretrainJobConfig, data: Any):
    def finish(group: Any) -> dict[str, Any]:
        if not cfg.train.sample_tokens:
            return {}
        from trellis.data_pipeline.tokenizer import Tokenizer
        tok = Tokenizer(data.tokenizer_path)
        out = group.call("sample", tok.encode(data.sample_prompt), cfg.train.sample_tokens,
                         tok.eos_id)[0]
        return {"sample": data.sample_prompt + tok.decode(out)}
    return finish


def run(args: argparse.Namespace) -> int:
    print_result(pretrain(resolve_config(PretrainJobConfig, args), local=args.local,
                          address=args.address))
    return 0


def main(argv: list[str] | None = None) -> int:  # python -m launcher.pretrain
    from trellis.launcher.cli import main as cli_main
    return cli_main(["pretrain", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())

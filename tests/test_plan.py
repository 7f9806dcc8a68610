"""`trellis plan`: shapes count what the real modules hold; model states agree with
DeepSpeed's own estimators where they exist and with live DeepSpeed engines (gloo, 1-2
ranks, ZeRO 0-3, fp32 and bf16) within 10%; the CLI names what fits and its suggestions do
fit; bad input fails in one line; the README's table is the command's output; the KubeRay
RayJob and the autoscaler config request what the plan says their job needs."""
from __future__ import annotations

import gc
import json
import math
import shlex
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from trellis.launcher.config_loader import ConfigError, load_config
from trellis.launcher.jobs.plan.config import ClusterSpec, PlanConfig
from trellis.launcher.jobs.plan.estimate import job_plan, plan, resolve_shape, suggestions, \
    with_changes
from trellis.model.build import build_model
from trellis.model.config import ModelConfig
from trellis.model.shape import named, of_config, of_hf
from trellis.parallel.config import ParallelConfig
from trellis.parallel.memory_plan import deepspeed_estimate, model_states

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


# ---- shapes --------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,head", [("gpt-tiny", "lm"), ("gpt-small-cpu", "value"),
                                         ("bert-tiny", "mlm"), ("gpt-tiny", "score")])
def test_shape_counts_the_built_module(preset, head):
    cfg = ModelConfig.from_preset(preset, vocab_size=512, max_seq_len=64)
    module = build_model(cfg, head)
    shape = of_config(cfg, head)
    assert shape.params == sum(p.numel() for p in module.parameters())
    assert shape.largest_layer == max(sum(p.numel() for p in m.parameters(recurse=False))
                                      for m in module.modules())


def test_published_sizes_and_hf_configs():
    # GPT-2 124M/355M/774M/1.5B and Llama 2 7B/13B/70B as released
    want = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
            "gpt2-xl": 1_557_611_200, "llama-2-7b": 6_738_415_616,
            "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192}
    assert {n: named(n).params for n in want} == want
    hf_gpt2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
               "n_layer": 12, "n_head": 12, "activation_function": "gelu_new"}
    assert of_hf(hf_gpt2).params == want["gpt2"]
    assert named("llama-2-70b").n_kv_head == 8


# ---- model states against DeepSpeed's estimators ---------------------------------------------
@pytest.mark.parametrize("stage,offload_opt,offload_par",
                         [(2, False, False), (2, True, False), (3, False, False),
                          (3, True, False), (3, True, True)])
def test_mixed_precision_states_and_deepspeed_estimators(stage, offload_opt, offload_par):
    shape = named("gpt2-xl")
    par = ParallelConfig(num_workers=8, zero_stage=stage, precision="bf16",
                         offload_optimizer=offload_opt, offload_params=offload_par)
    params, grads, opt, extra, _ = model_states(shape, par, trainable=True)
    ds_gpu, _ = deepspeed_estimate(shape, par, True, gpus_per_node=8)
    ours = params + grads + opt + extra
    if stage == 2 or offload_opt:  # same itemization: equal
        assert abs(ours - ds_gpu) <= 8, (ours, ds_gpu)
    else:  # ours holds the bf16 gradient partition besides the fp32 one at the step (+2P/N)
        assert ours == pytest.approx(ds_gpu + 2 * shape.params / 8, rel=1e-6)
    assert deepspeed_estimate(shape, ParallelConfig(zero_stage=2, precision="fp32"), True,
                              8) is None


# ---- live engines ----------------------------------------------------------------------------
# Every ZeRO stage on the tiny preset; the larger preset and bf16 at the stages whose
# accounting differs most (0: nothing sharded, 3: parameters sharded too).
CASES = [("gpt-tiny", "fp32", stage, True) for stage in range(4)] \
    + [(p, prec, stage, True) for p, prec in (("gpt-small-cpu", "fp32"), ("gpt-tiny", "bf16"))
       for stage in (0, 2, 3)] \
    + [("gpt-tiny", "fp32", stage, False) for stage in (0, 3)]  # frozen engines


def _model_cfg(preset: str) -> ModelConfig:
    return ModelConfig.from_preset(preset, vocab_size=512, max_seq_len=64)


def _held_worker(rank: int, world: int, port: int, queue) -> None:
    """One rank: per case a fresh engine, one step taken and the next micro-batch's
    gradients live (optimizer state allocated), then its tensors counted."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import trellis.parallel.engine as pe
    from trellis.model.losses import token_cross_entropy
    from trellis.parallel import dist
    from trellis.parallel.config import OptimConfig
    from trellis.parallel.held_memory import held_bytes
    dist.init_distributed(rank, world, master_port=port, backend="gloo")
    x = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(rank))
    for case in CASES:
        preset, prec, stage, trainable = case
        par = ParallelConfig(num_workers=world, zero_stage=stage, micro_batch_size=2,
                             precision=prec)
        torch.manual_seed(0)
        with pe.zero_init_context(par):
            model = build_model(_model_cfg(preset))
        engine = pe.Engine(model, OptimConfig() if trainable else None, par, total_steps=10,
                           trainable=trainable)
        if trainable:
            for i in range(2):
                engine.backward(token_cross_entropy(engine(x[:, :-1]), x[:, 1:]).float())
                if i == 0:
                    engine.step()
        queue.put((case, world, rank, held_bytes(engine)["total"]))
        del engine, model
        gc.collect()
    dist.barrier()


@pytest.mark.integration
def test_plan_matches_live_engines_within_10_percent():
    import torch.multiprocessing as mp
    from trellis.parallel.dist import free_port
    ctx = mp.get_context("spawn")
    queue, procs = ctx.Queue(), []
    for world in (1, 2):
        port = free_port()
        for rank in range(world):
            procs.append(ctx.Process(target=_held_worker, args=(rank, world, port, queue)))
            procs[-1].start()
    live = [queue.get(timeout=900) for _ in range(3 * len(CASES))]
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    worst = 0.0
    for (preset, prec, stage, trainable), world, rank, held in live:
        par = ParallelConfig(num_workers=world, zero_stage=stage, precision=prec)
        shape = of_config(_model_cfg(preset))
        planned = sum(model_states(shape, par, trainable, on_cpu=True)[:3])
        err = abs(planned - held) / held
        worst = max(worst, err)
        assert err <= 0.10, (preset, prec, stage, trainable, world, rank, planned, held)
    print(f"plan vs live engines: {len(live)} ranks, worst error {worst:.1%}")


# ---- the command -----------------------------------------------------------------------------
def test_ppo_7b_report_names_roles_and_a_fix_that_fits():
    from trellis.launcher.jobs.plan.driver import report
    cfg = load_config(PlanConfig, None, ["job=ppo", "model=llama-2-7b"])
    text = "\n".join(report(cfg))
    for role in ("actor", "critic", "reference", "reward"):
        assert f"\n{role} " in text
    assert "does NOT fit" in text and "fits with --set" in text
    fixes = suggestions(cfg)
    assert fixes and not plan(cfg).fits
    for f in fixes:  # each suggestion, applied through --set, fits
        redo = load_config(PlanConfig, None, ["job=ppo", "model=llama-2-7b", *f.label.split()])
        assert plan(redo).fits, f.label
    # more ZeRO, offload and nodes each lower the per-GPU figure
    base = plan(cfg).per_gpu
    for change in ({"parallel.zero_stage": 3}, {"parallel.offload_optimizer": True}):
        assert plan(with_changes(cfg, change)).per_gpu < base
    assert plan(with_changes(cfg, {}, nodes=2)).per_gpu < base


def test_separate_roles_and_cpu_cluster():
    sep = plan(load_config(PlanConfig, None, [
        "job=ppo", "placement=separate", "role_gpus={actor: 4, critic: 2, reference: 1, reward: 1}"]))
    assert {r.role: r.ranks for r in sep.roles} == {"actor": 4, "critic": 2, "reference": 1,
                                                    "reward": 1}
    assert sep.per_gpu == max(r.peak for r in sep.roles)
    cpu = plan(load_config(PlanConfig, None, ["model=gpt-small-cpu", "cluster.gpus_per_node=0",
                                              "cluster.cpu_ranks_per_node=2",
                                              "parallel.gpus_per_worker=0"]))
    assert cpu.gpus == 2 and cpu.fits and cpu.host_per_node >= 2 * cpu.roles[0].peak


@pytest.mark.parametrize("job", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_jobs_plan_no_critic(job):
    from trellis.launcher.jobs.plan.driver import report
    ppo = plan(load_config(PlanConfig, None, ["job=ppo", "model=llama-2-7b"]))
    cf = plan(load_config(PlanConfig, None, [f"job={job}", "model=llama-2-7b"]))
    peaks = {r.role: r.peak for r in ppo.roles}
    assert {r.role: r.peak for r in cf.roles} == {k: v for k, v in peaks.items() if k != "critic"}
    assert cf.per_gpu == ppo.per_gpu - peaks["critic"] and "critic" not in cf.bundles
    assert "rollout batch 64" in report(load_config(PlanConfig, None, [f"job={job}"]))[0]
    # separate placement: three roles share the GPUs (PPO would need a fourth for its critic)
    sep = plan(load_config(PlanConfig, None, [f"job={job}", "placement=separate",
                                              "cluster.gpus_per_node=3"]))
    assert {r.role: r.ranks for r in sep.roles} == {"actor": 1, "reference": 1, "reward": 1}
    with pytest.raises(ConfigError, match="a GPU per role \\(4\\)"):
        plan(load_config(PlanConfig, None, ["job=ppo", "placement=separate",
                                            "cluster.gpus_per_node=3"]))


def test_model_from_files(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model:\n  preset: gpt-tiny\n  vocab_size: 512\n")
    assert resolve_shape(str(job), "lm").params == \
        of_config(ModelConfig.from_preset("gpt-tiny", vocab_size=512)).params
    hf = tmp_path / "config.json"
    hf.write_text(json.dumps({"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "vocab_size": 100}))
    s = resolve_shape(str(hf), "lm")
    assert s.params == 100 * 64 * 2 + 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 128) + 64


@pytest.mark.parametrize("overrides,match", [
    (["model=gpt5"], "config key 'model'.*unknown model 'gpt5'"),
    (["model=no/such/config.json"], "config key 'model'.*neither a preset"),
    (["job=ppo", "placement=separate", "role_gpus={actor: 4}"], "config key 'role_gpus'"),
    (["job=ppo", "placement=separate", "cluster.gpus_per_node=2"], "config key 'placement'"),
    (["job=kto"], "config key 'job'"),
])
def test_bad_input_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        plan(load_config(PlanConfig, None, overrides))
    assert "\n" not in str(e.value)


def test_bad_model_files_one_line(tmp_path):
    bad_type = tmp_path / "config.json"
    bad_type.write_text(json.dumps({"model_type": "t5"}))
    no_model = tmp_path / "job.yaml"
    no_model.write_text("train: {steps: 3}\n")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path, match in ((bad_type, "'model_type'='t5' is not supported"),
                        (no_model, "no model: section"), (broken, "Expecting")):
        with pytest.raises(ConfigError, match=match) as e:
            resolve_shape(str(path), "lm")
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_readme_table_is_the_commands_output():
    from trellis.launcher.jobs.plan.driver import table
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- trellis plan --table -->\n") + len("<!-- trellis plan --table -->\n")
    block = text[start:text.index("<!-- end of table -->")].strip().splitlines()
    assert block == table(load_config(PlanConfig, None, ["job=ppo"]))


# ---- cluster configs request what the plan says -------------------------------------------
# GPU memory by GPU-feature-discovery product label / cloud instance type (vendor specs).
GPU_PRODUCT_GIB = {"NVIDIA-A100-SXM4-80GB": 80, "NVIDIA-H100-80GB-HBM3": 80,
                   "NVIDIA-H200": 141, "NVIDIA-A10G": 24}
INSTANCES = {"g5.12xlarge": {"gpus": 4, "gpu_gib": 24, "cpus": 48, "mem_gib": 192}}


def _rayjob_job():
    """The RayJob's entrypoint as the job config it runs (the job both configs are sized for)."""
    from trellis.launcher.cli import build_parser
    from trellis.launcher.registry import COMMANDS
    m = yaml.safe_load((ROOT / "cluster" / "configs" / "rayjob.yaml").read_text())
    argv = shlex.split(m["spec"]["entrypoint"])[1:]
    args = build_parser(argv).parse_args(argv)
    cfg = load_config(COMMANDS[args.command].config_class(), ROOT / args.config, args.overrides)
    return m, args.command, cfg


def _gib(q: str) -> float:
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    return float(q[:-2]) * units[q[-2:]]


def test_rayjob_requests_what_the_plan_needs():
    m, kind, job = _rayjob_job()
    spec = m["spec"]["rayClusterSpec"]
    head_cpus = float(spec["headGroupSpec"]["rayStartParams"].get("num-cpus", 1))
    groups = spec["workerGroupSpecs"]
    gpus = cpus = 0.0
    for g in groups:
        pod = g["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["requests"] == res["limits"]
        per_pod = int(res["limits"].get("nvidia.com/gpu", 0))
        gpus += g["replicas"] * per_pod
        cpus += g["replicas"] * float(res["limits"]["cpu"])
        if per_pod:
            product = pod["nodeSelector"]["nvidia.com/gpu.product"]
            cluster = ClusterSpec(nodes=g["replicas"], gpus_per_node=per_pod,
                                  gpu_memory_gib=GPU_PRODUCT_GIB[product],
                                  host_memory_gib=_gib(res["limits"]["memory"]))
            p = job_plan(kind, job, cluster)
            assert p.gpus == job.parallel.num_workers
            assert p.fits, (p.per_gpu / GIB, p.host_per_node / GIB)
    ray_gpus = job.parallel.num_workers * job.parallel.gpus_per_worker
    assert gpus == ray_gpus, f"the RayJob asks for {gpus} GPUs, the job uses {ray_gpus}"
    need_cpus = job.parallel.num_workers * job.parallel.cpus_per_worker + m["spec"]["entrypointNumCpus"]
    assert head_cpus + cpus >= need_cpus


def test_autoscaler_can_hold_what_the_plan_needs():
    _, kind, job = _rayjob_job()
    cfg = yaml.safe_load((ROOT / "cluster" / "configs" / "autoscaler.yaml").read_text())
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # the driver only
    gpu_types = [t for t in types.values() if t["node_config"].get("InstanceType") in INSTANCES
                 and INSTANCES[t["node_config"]["InstanceType"]]["gpus"]]
    assert gpu_types
    inst = INSTANCES[gpu_types[0]["node_config"]["InstanceType"]]
    need_gpus = job.parallel.num_workers * job.parallel.gpus_per_worker
    nodes = math.ceil(need_gpus / inst["gpus"])
    p = job_plan(kind, job, ClusterSpec(nodes=nodes, gpus_per_node=inst["gpus"],
                                        gpu_memory_gib=inst["gpu_gib"],
                                        host_memory_gib=inst["mem_gib"]))
    assert p.fits and p.gpus >= need_gpus
    assert nodes <= min(gpu_types[0]["max_workers"], cfg["max_workers"])
    assert nodes * inst["cpus"] >= job.parallel.num_workers * job.parallel.cpus_per_worker + 1

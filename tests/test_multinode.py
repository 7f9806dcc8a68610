"""Several Ray nodes on one machine (ray.cluster_utils.Cluster on 127.0.0.1, each node with
its own custom resource): pretraining whose ranks are SPREAD over two nodes (gloo across
them) equals the run packed on one node; PPO roles pinned to different nodes; the loss of a
whole node (raylet and every process under it, SIGKILL) mid-run, recovered on the survivors,
or on a replacement node, or refused in one line naming the missing resource; a rank that
stops answering ends the job in one line naming it and its node.

Nodes: head (no CPUs: the driver only), node_a {node_a, pool}, node_b {node_b, pool,
survivor}; the node-loss tests add their own node and kill it. Health checks are set fast
(1 s period, 3 misses) so the head writes a dead node off within seconds."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from test_pretrain import corpus, job, losses  # noqa: F401 -- corpus is a fixture

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.integration

STEPS = 20
LOOPBACK = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
HEALTH = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
          "health_check_failure_threshold": 3}
DEADLINE_S = 300  # for events that come within seconds; ends a helper thread, never a run
# A healthy peer must never wait this long in a collective, even where busy processes
# share the cores (Ray's workers then get a few % of a core: a step can take seconds).
HUNG_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 0, "_system_config": HEALTH, **LOOPBACK})
    c.add_node(num_cpus=2, resources={"node_a": 1, "pool": 1}, **LOOPBACK)
    c.add_node(num_cpus=2, resources={"node_b": 1, "pool": 1, "survivor": 1}, **LOOPBACK)
    try:
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:  # Cluster names itself in /tmp/ray/ray_current_cluster until shut down
        ray.shutdown()
        c.shutdown()


def base(tmp_path: Path, corpus: dict, *extra: str):
    # 4 micro-batches a step: ~0.1 s steps leave the watcher time to act mid-run
    return job(tmp_path, corpus, "parallel.num_workers=2", "parallel.zero_stage=2",
               "parallel.grad_accum=4", f"train.steps={STEPS}", "checkpoint.every=4",
               "checkpoint.keep_last=5", "train.eval_batches=1", *extra)


class Watcher:
    """Reads where each rank's actor runs (its node id, from Ray's actor table) while a
    job runs; optionally acts once the job has logged `at_step`."""

    def __init__(self, run_dir: Path, names: tuple[str, ...] = ("pretrain/rank0", "pretrain/rank1"),
                 at_step: int = 0, action=None):
        self.run_dir, self.names = run_dir, list(names)
        self.at_step, self.action = at_step, action
        self.nodes: dict[str, str] = {}
        self.acted_at: float | None = None
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        deadline = time.time() + DEADLINE_S
        while time.time() < deadline:
            try:
                for n in self.names:
                    if n not in self.nodes:
                        self.nodes[n] = actor_node(n)
            except Exception:  # not started yet, or between sessions
                pass
            done = len(self.nodes) == len(self.names)
            if self.action is None and done:
                return
            csv = self.run_dir / "metrics" / "train.csv"
            if done and csv.exists() and max(losses(self.run_dir), default=0) >= self.at_step:
                self.acted_at = time.time()
                self.action(self)
                return
            time.sleep(0.05)

    def join(self, timeout_s: float = 10) -> None:
        self.thread.join(timeout=timeout_s)


def actor_info(name: str) -> dict:
    """A named live actor's row in Ray's actor table (the GCS): asking the actor itself
    queues behind its running method, and under load a short job can end first."""
    from ray._private.state import actors
    info = actors(actor_id=ray.get_actor(name)._actor_id.hex())
    if info.get("State") != "ALIVE":
        raise LookupError(f"{name} is not alive yet")
    return info


def actor_node(name: str) -> str:
    return actor_info(name)["Address"]["NodeID"]


def kill_node(cluster, node_id: str):
    """SIGKILL a worker node's raylet and every process under it (its workers, agents) at
    once, then drop it from the cluster's books."""
    import psutil

    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    for p in [*raylet.children(recursive=True), raylet]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    cluster.remove_node(node, allow_graceful=False)


def node_with(resource: str) -> str:
    """The id of the alive node that declares `resource`."""
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


@pytest.fixture(scope="module")
def spread(cluster, corpus, tmp_path_factory):  # noqa: F811
    """The SPREAD run over node_a and node_b (the baseline of every loss check here)."""
    from trellis.launcher.jobs.pretrain.driver import pretrain
    run_dir = tmp_path_factory.mktemp("spread")
    w = Watcher(run_dir)
    result = pretrain(base(run_dir, corpus, "parallel.placement=SPREAD"))
    w.join()
    return result, losses(run_dir), w.nodes


def test_spread_ranks_on_two_nodes_equal_one_node(spread, cluster, corpus, tmp_path):  # noqa: F811
    from trellis.launcher.jobs.pretrain.driver import pretrain
    result, curve, nodes = spread
    assert len(nodes) == 2 and len(set(nodes.values())) == 2, nodes
    assert set(nodes.values()) == {node_with("node_a"), node_with("node_b")}
    w = Watcher(tmp_path)
    pretrain(base(tmp_path, corpus, "parallel.resources={node_a: 0.01}"))
    w.join()
    assert set(w.nodes.values()) == {node_with("node_a")}, w.nodes
    one = losses(tmp_path)
    assert sorted(one) == sorted(curve) == list(range(1, STEPS + 1))
    for step in curve:
        assert abs(curve[step] - one[step]) <= 1e-6, (step, curve[step], one[step])
    assert result["step"] == STEPS


def _node_loss_run(cluster, corpus, tmp_path, resource: str, victim: str,  # noqa: F811
                   *extra: str, replace: dict | None = None):
    """Pretrain (in a thread) pinned to nodes with `resource`; here, once it has logged step
    5 (checkpoints every 4), SIGKILL the node that declares `victim` and, with `replace`,
    add a node with those resources (Ray adds nodes from the main thread only)."""
    from trellis.launcher.jobs.pretrain.driver import pretrain
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = pretrain(base(tmp_path, corpus, f"parallel.resources={{{resource}: "
                                          f"0.01}}", "parallel.placement=SPREAD", *extra))
        except BaseException as e:  # noqa: BLE001 -- handed to the test thread
            out["error"] = e

    w = Watcher(tmp_path)
    job_thread = threading.Thread(target=run, daemon=True)
    job_thread.start()
    w.join(DEADLINE_S)
    csv, deadline = tmp_path / "metrics" / "train.csv", time.time() + DEADLINE_S
    while time.time() < deadline and not (csv.exists() and max(losses(tmp_path)) >= 5):
        time.sleep(0.02)
    gone = node_with(victim)
    killed = {"node": gone, "at": time.time(),
              "ranks_there": sorted(n for n, node in w.nodes.items() if node == gone)}
    kill_node(cluster, gone)
    if replace is not None:
        cluster.add_node(num_cpus=2, resources=replace, **LOOPBACK)
    job_thread.join(DEADLINE_S * 2)
    assert not job_thread.is_alive(), "the job did not end"
    if "error" in out:
        raise out["error"]
    return out["result"], killed


def _figures(result: dict, killed: dict) -> str:
    rec = result["recovery_log"][0]
    return (f"node loss: detected {rec['failed_at'] - killed['at']:.1f} s after the kill, "
            f"resumed {rec['resumed_at'] - rec['failed_at']:.1f} s after that")


def test_node_loss_resumes_on_survivors_to_same_loss(spread, cluster, corpus, tmp_path):  # noqa: F811
    _, straight, _ = spread
    cluster.add_node(num_cpus=2, resources={"survivor": 1, "node_c": 1}, **LOOPBACK)
    result, killed = _node_loss_run(cluster, corpus, tmp_path, "survivor", "node_c",
                                    "train.max_failures=1")
    assert len(killed["ranks_there"]) == 1, killed  # one rank on node_b, one on node_c
    assert result["step"] == STEPS and result["recoveries"] == 1
    assert "died" in result["recovery_log"][0]["error"]
    assert abs(result["loss"] - straight[STEPS]) <= 1e-6, (result["loss"], straight[STEPS])
    print(_figures(result, killed), f"final loss {result['loss']:.6f} = {straight[STEPS]:.6f}")


def test_node_loss_waits_for_a_replacement_node(spread, cluster, corpus, tmp_path):  # noqa: F811
    _, straight, _ = spread
    cluster.add_node(num_cpus=2, resources={"node_d": 1}, **LOOPBACK)
    result, killed = _node_loss_run(cluster, corpus, tmp_path, "node_d", "node_d",
                                    "train.max_failures=1",
                                    "parallel.placement_timeout_s=300",
                                    replace={"node_d": 1})
    assert killed["ranks_there"] == ["pretrain/rank0", "pretrain/rank1"], killed
    assert result["step"] == STEPS and result["recoveries"] == 1
    assert abs(result["loss"] - straight[STEPS]) <= 1e-6, (result["loss"], straight[STEPS])
    print(_figures(result, killed), "(on a replacement node)")


def test_node_loss_without_resources_fails_in_one_line(cluster, corpus, tmp_path):  # noqa: F811
    cluster.add_node(num_cpus=2, resources={"node_e": 1}, **LOOPBACK)
    with pytest.raises(SystemExit) as err:
        _node_loss_run(cluster, corpus, tmp_path, "node_e", "node_e", "train.max_failures=1",
                       "parallel.placement_timeout_s=3")
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert "group 'pretrain'" in msg and "resource 'node_e' (no alive node has it)" in msg, msg
    print(msg)


def test_hung_rank_is_named_with_its_node(cluster, corpus, tmp_path):  # noqa: F811
    from trellis.launcher.jobs.pretrain.driver import pretrain
    stopped: list[int] = []

    def stop_rank1(w: Watcher) -> None:  # the process stays, but answers nothing
        pid = actor_info("pretrain/rank1")["Pid"]  # the actor table: no queue behind a step
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    w = Watcher(tmp_path, at_step=2, action=stop_rank1)
    try:
        with pytest.raises(SystemExit) as err:
            pretrain(base(tmp_path, corpus, "parallel.placement=SPREAD",
                          f"parallel.collective_timeout_s={HUNG_TIMEOUT_S}",
                          "train.steps=400"))
    finally:
        w.join()
        for pid in stopped:
            os.kill(pid, signal.SIGKILL)
    msg = str(err.value)
    assert stopped and "\n" not in msg, msg
    node = w.nodes["pretrain/rank1"][:8]
    assert f"pretrain/rank1 on node {node} (127.0.0.1) stopped answering: rank 0's " \
           f"collective timed out after {HUNG_TIMEOUT_S}s (parallel.collective_timeout_s)" \
           in msg, msg
    print(msg)


@pytest.fixture(scope="module")
def ppo_init(tmp_path_factory) -> dict[str, Path]:
    """Untrained tiny policy and reward model (placement is the question here, not
    learning), the demo task's prompts and a tokenizer trained on its text."""
    import torch

    from trellis.data_pipeline.tokenizer import (TOKENIZER_FILE, TokenizerConfig,
                                                 copy_tokenizer, train_tokenizer)
    from trellis.model.build import build_model
    from trellis.model.config import ModelConfig
    from trellis.model.io import save_module
    from trellis.rl.demo_task import DemoTaskConfig, write_demo_data, write_pretrain_corpus

    root = tmp_path_factory.mktemp("ppo_init")
    paths = write_demo_data(root / "task", DemoTaskConfig())
    text = write_pretrain_corpus(root / "corpus", 2000).read_text()
    tok = train_tokenizer(TokenizerConfig(vocab_size=512), [text], root / TOKENIZER_FILE)
    cfg = ModelConfig.from_preset("gpt-tiny", vocab_size=tok.vocab_size, max_seq_len=64)
    out = {"prompts": paths["prompts_train"]}
    for name, head in (("actor", "lm"), ("reward", "score")):
        torch.manual_seed(0)
        out[name] = save_module(build_model(cfg, head), cfg, head, root / name)
        copy_tokenizer(root / TOKENIZER_FILE, out[name])
    return out


ROLE_NODE = {"actor": "node_a", "critic": "node_a", "reference": "node_b", "reward": "node_b"}


def test_ppo_roles_on_the_nodes_asked_for(cluster, ppo_init, tmp_path):
    from trellis.launcher.config_loader import load_config
    from trellis.launcher.jobs.ppo.config import PPOJobConfig
    from trellis.launcher.jobs.ppo.driver import ppo

    cfg = load_config(PPOJobConfig, None, [
        f"run_dir={tmp_path}", f"actor_init={ppo_init['actor']}",
        f"reward_init={ppo_init['reward']}", f"prompts={ppo_init['prompts']}",
        "ppo.prompts_per_iteration=8", "ppo.minibatches=1", "ppo.ppo_epochs=1",
        "ppo.max_new_tokens=4", "ppo.max_prompt_len=24", "ppo.eval_prompts=0",
        "train.steps=1", "metrics.port=-1", "placement=separate",
        *[f"{r}.parallel.{k}" for r, n in ROLE_NODE.items()
          for k in (f"resources={{{n}: 0.01}}", "cpus_per_worker=0.2")]])
    w = Watcher(tmp_path, names=tuple(f"{r}/rank0" for r in ROLE_NODE))
    res = ppo(cfg)
    w.join()
    assert res["iteration"] == 1
    where = {name.split("/")[0]: node for name, node in w.nodes.items()}
    assert where == {r: node_with(n) for r, n in ROLE_NODE.items()}, where
    assert node_with("node_a") != node_with("node_b")

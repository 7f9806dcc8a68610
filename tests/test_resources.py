"""What a group asks Ray for, and the one line saying what is missing when it does not come
(pure functions; the live cases are in test_multinode.py and test_parallel_workers.py)."""
import pytest

from trellis.launcher.config_loader import ConfigError, load_config
from trellis.parallel.config import ParallelConfig
from trellis.parallel.resources import bundle_of, shortfall


def test_bundle_sums_colocated_roles_and_custom_resources():
    a = ParallelConfig(cpus_per_worker=0.2, gpus_per_worker=0.5, resources={"node_a": 0.01})
    b = ParallelConfig(cpus_per_worker=0.3, resources={"node_a": 0.01, "big_mem": 1})
    assert bundle_of([a, b]) == pytest.approx({"CPU": 0.5, "GPU": 0.5, "node_a": 0.02,
                                               "big_mem": 1.0})
    assert bundle_of([ParallelConfig(cpus_per_worker=0.4)]) == {"CPU": 0.4}  # no zero GPU


@pytest.mark.parametrize("nodes,free,want", [
    ([{"CPU": 2.0}], {"CPU": 2.0}, "resource 'node_d' (no alive node has it)"),
    ([{"CPU": 0.5, "node_d": 1}], {"CPU": 0.5, "node_d": 1}, "CPU 0.8 needed, 0.5 on 1 alive node(s)"),
    ([{"CPU": 2, "node_d": 1}], {"CPU": 0.1, "node_d": 1}, "CPU 0.8 needed, 0.1 free (held by"),
    ([{"CPU": 2}, {"node_d": 1}], {"CPU": 2, "node_d": 1}, "no alive node holds a whole bundle"),
])
def test_shortfall_names_what_is_missing(nodes, free, want):
    bundles = [{"CPU": 0.4, "node_d": 0.01}] * 2
    assert want in shortfall(bundles, nodes, free)


def test_bad_custom_resources_fail_at_load():
    for bad in ("{CPU: 1}", "{node_a: 0}"):
        with pytest.raises(ConfigError, match="resources .* positive amount and a name other"):
            load_config(ParallelConfig, None, [f"resources={bad}"])

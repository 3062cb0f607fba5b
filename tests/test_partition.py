from collections import Counter

import datasets
import numpy as np
import pytest

from e2e_task.data import E2E_SAMPLE_PATH, load_e2e_csv, mr_slot
from hf_fsl_sage.federation.partition import (
    NONE_GROUP,
    client_datasets,
    describe_partition,
    partition,
    partition_dirichlet,
    partition_groups,
    partition_iid,
)


@pytest.fixture(scope="module")
def sample():
    return load_e2e_csv(E2E_SAMPLE_PATH)


def _assert_exact_cover(parts, n):
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


def test_iid_sizes_and_cover():
    parts = partition_iid(103, 10, seed=0)
    _assert_exact_cover(parts, 103)
    assert Counter(len(p) for p in parts) == {11: 3, 10: 7}
    assert partition_iid(103, 10, seed=0) == parts
    assert partition_iid(103, 10, seed=1) != parts
    assert [len(p) for p in partition_iid(7, 7, seed=0)] == [1] * 7


def test_iid_too_few_examples():
    with pytest.raises(ValueError, match="fewer clients"):
        partition_iid(3, 4, seed=0)


@pytest.mark.parametrize("alpha", [0.01, 0.5, 100.0])
def test_dirichlet_cover_and_min_size(sample, alpha):
    groups = partition_groups(sample, mr_slot("customer rating"))
    parts = partition_dirichlet(groups, num_clients=10, alpha=alpha, seed=0, min_size=5)
    _assert_exact_cover(parts, len(sample))
    assert len(parts) == 10
    assert min(len(p) for p in parts) >= 5


def test_dirichlet_impossible_min_size():
    with pytest.raises(ValueError, match=r"at least 3 example\(s\) each from 20 examples"):
        partition_dirichlet(["a"] * 20, num_clients=10, alpha=1.0, seed=0, min_size=3)
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(["a"] * 20, num_clients=2, alpha=0.0, seed=0)


def test_dirichlet_small_alpha_is_more_skewed(sample):
    groups = partition_groups(sample, mr_slot("customer rating"))

    def skew(alpha):
        return np.mean(
            [
                describe_partition(partition_dirichlet(groups, 10, alpha, seed=s), groups)["mean_tv_distance"]
                for s in range(5)
            ]
        )

    small, medium, large = skew(0.1), skew(1.0), skew(100.0)
    # Measured on the shipped sample (7 groups): ~0.66, ~0.31, ~0.09.
    assert small > 0.5
    assert large < 0.15
    assert small > medium > large


def test_dirichlet_reproducible(sample):
    groups = partition_groups(sample, mr_slot("eatType"))
    a = partition_dirichlet(groups, 5, 0.5, seed=3)
    assert partition_dirichlet(groups, 5, 0.5, seed=3) == a
    assert partition_dirichlet(groups, 5, 0.5, seed=4) != a


def test_partition_groups_by_mr_key(sample):
    groups = partition_groups(sample, mr_slot("eatType"))
    assert Counter(groups) == {"coffee shop": 937, NONE_GROUP: 266}
    food = Counter(partition_groups(sample, mr_slot("food")))
    assert food == {"English": 448, "Chinese": 406, NONE_GROUP: 349}
    with pytest.raises(ValueError, match="No column 'label'"):
        partition_groups(sample, "label")


def test_partition_dispatch(sample):
    iid = partition(sample, 4, scheme="iid", seed=0)
    assert iid == partition_iid(len(sample), 4, seed=0)
    by_food = partition(sample, 4, scheme="dirichlet", seed=0, alpha=0.3, group_by=mr_slot("food"))
    _assert_exact_cover(by_food, len(sample))
    with pytest.raises(ValueError, match="needs group_by"):
        partition(sample, 4, scheme="dirichlet")
    with pytest.raises(ValueError, match="Unknown partition scheme 'shards'"):
        partition(sample, 4, scheme="shards")

    labelled = datasets.Dataset.from_dict({"text": ["x"] * 40, "label": [i % 4 for i in range(40)]})
    parts = partition(labelled, 4, scheme="dirichlet", seed=0, alpha=1.0, group_by="label")
    _assert_exact_cover(parts, 40)
    assert [len(d) for d in client_datasets(labelled, parts)] == [len(p) for p in parts]


def test_describe_partition():
    groups = ["a", "a", "b", "b", "c", "c"]
    parts = [[0, 1], [2, 3, 4, 5]]
    d = describe_partition(parts, groups)
    assert d["sizes"] == [2, 4]
    assert d["num_examples"] == 6 and d["num_clients"] == 2
    assert d["min_size"] == 2 and d["max_size"] == 4
    assert d["num_groups"] == 3
    assert d["group_histograms"] == [{"a": 2}, {"b": 2, "c": 2}]
    # client 0: TV(a=1 vs 1/3 each) = 2/3; client 1: TV(b=c=1/2 vs 1/3 each) = 1/3
    assert d["mean_tv_distance"] == pytest.approx(0.5)
    assert describe_partition([[0, 2, 4], [1, 3, 5]], groups)["mean_tv_distance"] == pytest.approx(0.0)
    assert "group_histograms" not in describe_partition(parts)

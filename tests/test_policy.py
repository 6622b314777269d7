"""Contract tests over every registered policy, then exact scenarios per policy."""

import pytest

from tiercache.policy import (
    ADMISSION_POLICIES,
    EVICTION_POLICIES,
    LRUPolicy,
    S3FIFOPolicy,
    make_admission_policy,
    make_eviction_policy,
)


@pytest.fixture(params=sorted(EVICTION_POLICIES))
def policy(request):
    return make_eviction_policy(request.param)


def test_contract_victims_are_atomic_and_respect_protection(policy):
    for k in range(5):
        policy.insert(k)
    assert len(policy) == 5
    assert policy.victims(6) is None and len(policy) == 5            # impossible: nothing changes
    assert policy.victims(5, protected={0}) is None and len(policy) == 5
    got = policy.victims(2, protected={0, 1})
    assert got is not None and len(got) == 2 and not {0, 1} & set(got)
    assert policy.victims(0) == []


def test_contract_remove_and_contains(policy):
    policy.insert("a")
    policy.insert("b")
    assert "a" in policy
    policy.remove("a")
    policy.remove("zzz")  # unknown keys are ignored
    assert "a" not in policy and len(policy) == 1
    assert policy.victims(1) == ["b"]


def test_lru_exact_order():
    p = LRUPolicy()
    for k in "abcd":
        p.insert(k)
    p.touch("a")
    assert p.victims(2) == ["b", "c"]
    assert p.victims(1, protected={"b"}) == ["c"]


def test_fifo_ignores_reads():
    p = make_eviction_policy("fifo")
    for k in "abc":
        p.insert(k)
    p.touch("a")
    assert p.victims(1) == ["a"]


def test_s3fifo_keeps_reused_keys_over_one_hit_wonders():
    p = S3FIFOPolicy()
    for k in range(10):
        p.insert(k)
    for k in (0, 1, 2):
        p.touch(k)
    victims = p.victims(5)
    assert victims is not None and not {0, 1, 2} & set(victims)


def test_registry_errors_list_names():
    with pytest.raises(ValueError, match="lru"):
        make_eviction_policy("nope")
    with pytest.raises(ValueError, match="second_hit"):
        make_admission_policy("nope")


def test_second_hit_admission():
    a = make_admission_policy("second_hit")
    assert a.admit("k") is False
    assert a.admit("k") is True
    assert a.admit("j") is False
    assert all(make_admission_policy("all").admit(k) for k in range(3))
    assert set(ADMISSION_POLICIES) == {"all", "second_hit"}


def test_policy_module_does_not_import_torch():
    import ast
    import pathlib

    import tiercache.policy as mod
    tree = ast.parse(pathlib.Path(mod.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported and "torch" not in imported and "numpy" not in imported

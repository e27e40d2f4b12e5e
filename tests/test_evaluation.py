import itertools
import math

import pytest

from rlvr.evaluation import (
    format_eval_table,
    ks_for,
    pass_at_k,
    subject_slug,
    summarize_eval,
    summarize_records,
)


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(64, 0, 64) == 0.0
    assert pass_at_k(64, 1, 64) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)  # stable where C(n, k) overflows floats
    for n, c, k in [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_ks_for():
    assert ks_for(1) == [1]
    assert ks_for(4) == [1, 2, 4]
    assert ks_for(6) == [1, 2, 4, 6]  # n itself closes the curve
    assert ks_for(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert ks_for(100)[-2:] == [64, 100]
    assert ks_for(0) == []


def test_subject_slug():
    assert subject_slug("Counting & Probability") == "counting_and_probability"
    assert subject_slug("Intermediate Algebra") == "intermediate_algebra"
    assert subject_slug("Prealgebra") == "prealgebra"
    assert subject_slug("Number Theory") == "number_theory"


def test_summarize_eval_by_hand():
    correct = [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]
    subjects = ["Algebra", "Algebra", "Counting & Probability"]
    levels = [1, 5, None]
    out = summarize_eval(correct, subjects, levels)

    # Per-problem accuracies 1, 1/4, 0: mean 5/12; deviations 7/12, -2/12, -5/12.
    assert out["pass@1"] == pytest.approx(5 / 12)
    sd = math.sqrt((49 + 4 + 25) / 144 / 2)
    assert out["pass@1_se"] == pytest.approx(sd / math.sqrt(3))
    # pass@2 per problem: 1, 1 - C(3,2)/C(4,2) = 1/2, 0.  pass@4: 1, 1, 0.
    assert out["pass@2"] == pytest.approx(1.5 / 3)
    assert out["pass@4"] == pytest.approx(2 / 3)
    assert out["pass@1/algebra"] == pytest.approx(5 / 8)
    assert out["pass@1/counting_and_probability"] == 0.0
    assert out["pass@1/level_1"] == 1.0
    assert out["pass@1/level_5"] == 0.25
    assert out["pass@1/level_unknown"] == 0.0
    assert out["n_problems"] == 3
    assert out["n_samples_per_problem"] == 4
    assert "pass@3" not in out
    # SE of the per-problem pass@2 estimates 1, 1/2, 0: sd 1/2, over sqrt(3) problems
    assert out["pass@2_se"] == pytest.approx(0.5 / math.sqrt(3))
    # pass@4 per problem 1, 1, 0: mean 2/3, sd sqrt(1/3)
    assert out["pass@4_se"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))


def test_summarize_eval_sets_without_subjects():
    """AIME/AMC problems carry no subject or level: overall metrics only, no level_unknown."""
    out = summarize_eval([[1, 0], [0, 0]], [None, None], [None, None])
    assert out["pass@1"] == 0.25 and out["pass@2"] == 0.5
    assert not [k for k in out if k.startswith("pass@1/")]


def test_summarize_records_matches_summarize_eval_and_checks_samples():
    def rec(pid, j, score, **kw):
        return {"model": "m", "dataset": "d", "problem_id": pid, "sample": j, "score": score,
                "subject": "Algebra", "level": 2, "extracted": "1" if score else None,
                "response_tokens": 10 + j, "finish_reason": "length" if j == 2 else "stop", **kw}

    recs = [rec("a", j, s) for j, s in enumerate([1, 0, 1])] + \
        [rec("b", j, s) for j, s in enumerate([0, 0, 0])]
    out = summarize_records(recs[::-1])["m"]["d"]  # order of lines does not matter
    ref = summarize_eval([[1, 0, 1], [0, 0, 0]], ["Algebra"] * 2, [2, 2])
    assert {k: out[k] for k in ref} == pytest.approx(ref)
    assert out["n_samples"] == 6 and out["no_box_frac"] == pytest.approx(4 / 6)
    assert out["truncated_frac"] == pytest.approx(2 / 6) and out["response_len"] == 11
    assert ks_for(3) == [1, 2, 3] and "pass@3" in out
    with pytest.raises(ValueError, match="exactly once"):
        summarize_records(recs + [rec("a", 1, 0)])  # a duplicated sample


def test_summarize_eval_single_problem_and_errors():
    out = summarize_eval([[1, 0]], ["Geometry"], [3])
    assert out["pass@1"] == 0.5 and out["pass@1_se"] == 0.0 and out["pass@2"] == 1.0
    with pytest.raises(ValueError):
        summarize_eval([[1, 0], [1]], ["A", "B"], [1, 2])
    with pytest.raises(ValueError):
        summarize_eval([[1]], [], [1])
    with pytest.raises(ValueError):
        summarize_eval([], [], [])


def test_format_eval_table():
    m0 = summarize_eval([[1, 0, 0, 0], [0, 0, 0, 0]], ["Algebra"] * 2, [1, 2])
    m1 = summarize_eval([[1, 1, 0, 0], [1, 0, 0, 0]], ["Algebra"] * 2, [1, 2])
    table = format_eval_table([(0, m0), (100, m1)])
    lines = table.splitlines()
    assert len(lines) == 4
    assert "pass@1 ± se" in lines[0] and "pass@2" in lines[0] and "pass@4" in lines[0]
    assert lines[2].split()[0] == "0" and lines[3].split()[0] == "100"
    assert "0.3750" in lines[3]  # pass@1 at step 100
    assert format_eval_table([]) == "(no evaluations)"
    print(table)


def test_merged_shards_read_as_one_eval_in_the_sets_order():
    from rlvr.eval_run import EvalResult, merge_eval_results

    def part(ids, tokens, wall):
        recs = [{"problem_id": i, "sample": j} for i in ids for j in range(2)]
        return EvalResult(records=recs, scores=[[1.0, 0.0] for _ in ids], n_tokens=tokens,
                          n_graded=len(recs), wall_s=wall, gen_s=wall - 1)

    merged = merge_eval_results([part(["a", "b"], 10, 5.0), part(["c"], 7, 8.0),
                                 EvalResult(records=[], scores=[])])  # a share with no problems
    assert [(r["problem_id"], r["sample"]) for r in merged.records] == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    assert len(merged.scores) == 3 and merged.n_tokens == 17 and merged.n_graded == 6
    assert (merged.wall_s, merged.gen_s) == (8.0, 7.0)  # the shards ran side by side

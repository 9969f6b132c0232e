"""The real-corpus builder's deterministic parts (no model: embedding is too slow for CI)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from embedops.bench import real_corpus as rc

WORDS = "the quick brown fox jumps over the lazy dog while a patient cat watches it from the garden wall".split()


def _para(i: int, n: int = 24) -> str:
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n)) + f" number{i}."


def _write_tree(root: Path) -> None:
    (root / "pkg").mkdir()
    (root / "pkg" / "tests").mkdir()
    (root / "pkg" / "b.py").write_text(
        f'"""{_para(1)}\n\n{_para(2)}\n\n>>> doctest_is_skipped()\n"""\n'
        f'def f():\n    """{_para(3)}\n\n    too short.\n    """\n'
        f'class C:\n    """{_para(1).upper()}"""\n')  # a case-insensitive duplicate of b.py's first paragraph
    (root / "pkg" / "a.py").write_text(f'"""{_para(4)}\n{_para(5)}"""\n')  # one paragraph over two lines
    (root / "pkg" / "tests" / "test_x.py").write_text(f'"""{_para(6)}"""\n')  # test directories are skipped
    (root / "pkg" / "broken.py").write_text('def (:\n    """never parsed"""\n')


def test_collect_passages_sorted_deduplicated_filtered(tmp_path):
    _write_tree(tmp_path)
    passages, counts = rc.collect_passages([("tmp", tmp_path)])
    # files sorted (a.py before b.py), ast.walk order inside a file, whitespace normalised
    assert passages == [_para(4) + " " + _para(5), _para(1), _para(2), _para(3)]
    assert counts == {"tmp": 4}
    assert len({p.lower() for p in passages}) == len(passages)
    assert all(">>>" not in p and "  " not in p and "\n" not in p for p in passages)
    assert rc.collect_passages([("tmp", tmp_path)]) == (passages, counts)  # deterministic


def test_long_paragraphs_are_split_at_sentences():
    text = " ".join(f"Sentence {i} has exactly six words." for i in range(60))  # 360 words
    src = f'"""{text}"""\n'
    out = rc.docstring_paragraphs(src, min_words=20, max_words=200)
    assert len(out) == 2 and all(len(p.split()) <= 200 for p in out)
    assert " ".join(out) == text and all(p.endswith(".") for p in out)


def test_non_prose_is_dropped():
    src = '"""\nParameters\n----------\n' + _para(7) + '\n\n.. note:: ' + _para(8) + '\n\n' + \
          " ".join(["x=1,"] * 30) + '\n"""\n'
    out = rc.docstring_paragraphs(src)
    assert out == ["Parameters " + _para(7)]


def test_split_queries_disjoint_and_stable():
    passages = [_para(i) for i in range(300)]
    corpus, queries, held = rc.split_queries(passages, 200, 50, seed=0)
    assert len(corpus) == 200 and len(queries) == len(held) == 50
    assert not set(corpus) & set(held)
    assert queries == [rc.first_sentence(p) for p in held]
    # a larger corpus keeps the queries and extends the corpus; the walk order does not matter
    corpus2, queries2, _ = rc.split_queries(list(reversed(passages)), 250, 50, seed=0)
    assert queries2 == queries and corpus2[:200] == corpus
    _, queries3, _ = rc.split_queries(passages, 200, 50, seed=1)
    assert queries3 != queries
    with pytest.raises(ValueError, match="only 300 collected"):
        rc.split_queries(passages, 290, 50)


def test_first_sentence():
    assert rc.first_sentence("Return the sum of the values. More text follows here.") == "Return the sum of the values."
    assert rc.first_sentence("Too short. " + " ".join(["w"] * 40)) == " ".join(["Too", "short."] + ["w"] * 28)


def test_stdlib_walk_is_deterministic():
    root = Path(sysconfig.get_paths()["stdlib"]) / "json"
    a = rc.collect_passages([("json", root)])
    b = rc.collect_passages([("json", root)])
    assert a == b and a[0] and len(set(a[0])) == len(a[0])
    assert all(20 <= len(p.split()) <= 200 for p in a[0])


def test_recall_at_k_hand_example():
    truth = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    found = np.array([[3, 2, 9, 8], [7, 6, 5, 4]])
    assert rc.recall_at_k(found, truth, k=4) == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert rc.recall_at_k(found, truth, k=2) == pytest.approx((0 + 0) / 2)  # first 2 found vs first 2 true
    assert rc.recall_at_k(np.array([[1, 0], [-1, -1]]), truth, k=2) == pytest.approx(0.5)  # -1: no hit
    with pytest.raises(ValueError):
        rc.recall_at_k(found[:1], truth, k=4)
    with pytest.raises(ValueError):
        rc.recall_at_k(found, truth[:, :2], k=4)

"""The few-shot task data: tokens, built-in and folder domains, disjoint splits, the seeded LM task and
classification episode samplers, and clear errors for bad data."""
import json
import os
import re

import pytest
import torch

from metakernels.data import (PAD, DataError, EpisodeSampler, LMTaskSampler, decode, encode, folder_domains,
                              load_clinc150, load_labelled_folder, split_domains, stdlib_domains)

CLINC = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "clinc150")
needs_clinc = pytest.mark.skipif(not os.path.exists(os.path.join(CLINC, "data_full.json")),
                                 reason=f"CLINC150 is not at {CLINC}")


def numbered_text(n: int) -> str:
    """Text in which every 7-character window is unique: its chunks identify their positions."""
    return "".join(f"{i:06d}\n" for i in range(n))


def test_tokens_are_characters_with_non_latin1_as_255():
    text = "café ∑ x\n"
    tokens = encode(text)
    assert tokens.dtype == torch.int64 and tokens.numel() == len(text)
    assert tokens.tolist() == [ord(c) if ord(c) < 255 else 255 for c in text]
    assert decode(tokens) == "café \ufffd x\n"


def test_stdlib_domains_hold_docstrings_and_split_disjointly():
    domains = stdlib_domains()
    assert len(domains) >= 50 and all(len(t) >= 2000 for t in domains.values())
    assert "Return" in domains["json"] and "pydoc_data.topics" in domains
    splits = split_domains(domains)
    parts = [set(splits[s]) for s in ("train", "val", "test")]
    assert set().union(*parts) == set(domains)
    assert sum(map(len, parts)) == len(domains)
    assert splits == split_domains(domains) and splits != split_domains(domains, seed=1)


def test_split_needs_three_domains():
    with pytest.raises(DataError, match="at least 3"):
        split_domains(["a", "b"])
    assert {k: len(v) for k, v in split_domains(["a", "b", "c"]).items()} == {"train": 1, "val": 1, "test": 1}


def test_lm_sampler_draws_disjoint_chunks_of_one_domain_reproducibly():
    domains = {"a": numbered_text(300), "b": numbered_text(400)[::-1], "c": numbered_text(200)}
    sampler = LMTaskSampler(domains, n_support=3, n_query=2, seq_len=20, seed=5)
    batch = sampler.batch(7, 2)
    assert batch.support.shape == (2, 3, 21) and batch.query.shape == (2, 2, 21)
    assert len(set(batch.domains)) == 2
    for t, name in enumerate(batch.domains):
        chunks = [decode(c) for c in torch.cat([batch.support[t], batch.query[t]])]
        assert all(c in domains[name] for c in chunks)
        assert len({domains[name].index(c) for c in chunks}) == 5
    again = sampler.batch(7, 2)
    assert torch.equal(again.support, batch.support) and torch.equal(again.query, batch.query)
    assert not torch.equal(sampler.batch(8, 2).support, batch.support)
    assert sampler.batch(0, 7).support.shape[0] == 7   # more tasks than domains: drawn with replacement


def test_lm_sampler_keeps_query_chunks_out_of_their_support_set():
    """A domain that repeats a passage: half its text is one 21-character passage over and over (every grid
    chunk there is that passage, whatever the offset), half is unique.  The old sampler drew a query chunk
    equal to a support chunk in most tasks; now a query chunk is never one of its task's support chunks,
    and a domain without enough other chunks is named."""
    passage = "the same old passage\n"[:21]
    domains = {"repeats": numbered_text(60) + passage * 20, "unique": numbered_text(120)}
    sampler = LMTaskSampler(domains, n_support=3, n_query=3, seq_len=20, seed=1)
    repeated_support = 0
    for index in range(60):
        batch = sampler.batch(index, 2)
        for t in range(2):
            support = {decode(c) for c in batch.support[t]}
            assert not support & {decode(c) for c in batch.query[t]}, (index, t)
            repeated_support += any(chunk in passage * 2 for chunk in support)  # the passage at this offset
        again = sampler.batch(index, 2)
        assert torch.equal(again.support, batch.support) and torch.equal(again.query, batch.query)
    assert repeated_support > 20  # the passage was in many support sets, so its query draws were passed over
    with pytest.raises(DataError, match=r"domain 'echo' has fewer than 3 chunks of 21 characters that differ from "
                                        r"its 3 support chunks \(its text repeats\)"):
        LMTaskSampler({"echo": passage * 40}, n_support=3, n_query=3, seq_len=20).batch(0, 1)


def test_lm_sampler_names_domains_too_small():
    with pytest.raises(DataError, match=r"at least 43\): 'tiny' \(30 characters\)"):
        LMTaskSampler({"tiny": "x" * 30, "big": "y" * 1000}, n_support=2, n_query=1, seq_len=10)
    with pytest.raises(ValueError, match="n_query must be an int >= 1"):
        LMTaskSampler({"big": "y" * 1000}, n_query=0)


def test_samplers_refuse_data_of_the_other_kind():
    """A labelled-class dict given to the LM sampler, or a domain's text given as a class, is named; the
    episode sampler would otherwise take each character of a str as one example."""
    with pytest.raises(DataError, match="domain 'b' is a list; each domain must be one str"):
        LMTaskSampler({"a": "x" * 1000, "b": ["y" * 1000]})
    with pytest.raises(DataError, match="class 'a' must be a list of str, one text per example; got str"):
        EpisodeSampler({"a": "x" * 100, "b": ["y"] * 10}, n_way=2, k_shot=1, n_query=1)
    with pytest.raises(DataError, match="class 'b' must be a list of str, one text per example; got list holding"):
        EpisodeSampler({"a": ["x"] * 10, "b": [b"y"] * 10}, n_way=2, k_shot=1, n_query=1)


def test_samplers_check_their_seed_and_the_batch_index():
    lm = dict(domains={"a": numbered_text(80), "b": numbered_text(90)}, n_support=2, n_query=2, seq_len=8)
    episodes = dict(classes={c: [f"t{i}" for i in range(12)] for c in "abcdef"}, n_way=2, k_shot=2, n_query=2)
    for make in (lambda seed: LMTaskSampler(**lm, seed=seed), lambda seed: EpisodeSampler(**episodes, seed=seed)):
        for seed in (1.5, "1", None, True):
            with pytest.raises(TypeError, match=f"seed must be an int, got {re.escape(repr(seed))}"):
                make(seed)
        sampler = make(-3)  # any int
        for index in (-1, 1.5, True):
            with pytest.raises(ValueError, match=f"index must be an int >= 0 \\(the batch's number\\), got {index!r}"):
                sampler.batch(index, 2)
        assert torch.equal(sampler.batch(4, 2).support[0], sampler.batch(4, 2).support[0])


def test_folder_domains(tmp_path):
    (tmp_path / "alpha.txt").write_text("hello " * 10, encoding="utf-8")
    (tmp_path / "beta.txt").write_text("world " * 10, encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")
    assert folder_domains(tmp_path) == {"alpha": "hello " * 10, "beta": "world " * 10}
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: 0 characters"):
        folder_domains(tmp_path)
    (tmp_path / "empty.txt").unlink()
    (tmp_path / "gamma.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="gamma.txt: not UTF-8"):
        folder_domains(tmp_path)
    with pytest.raises(DataError, match="holds no .txt files"):
        folder_domains(tmp_path / "..")
    with pytest.raises(DataError, match="not a folder"):
        folder_domains(tmp_path / "missing")


def test_episode_sampler_labels_match_classes(tmp_path):
    classes = {f"class{c}": [f"{c} text number {i}" for i in range(12)] for c in range(6)}
    sampler = EpisodeSampler(classes, n_way=3, k_shot=2, n_query=4, max_len=16, seed=1)
    batch = sampler.batch(3, 5)
    (s_tokens, s_labels), (q_tokens, q_labels) = batch.support, batch.query
    assert s_tokens.shape == (5, 6, 16) and s_labels.shape == (5, 6)
    assert q_tokens.shape == (5, 12, 16) and q_labels.shape == (5, 12)
    for t in range(5):
        assert len(set(batch.classes[t])) == 3
        for tokens, labels in ((s_tokens[t], s_labels[t]), (q_tokens[t], q_labels[t])):
            for row, label in zip(tokens, labels.tolist()):
                text = decode(row[row != PAD])
                assert text in [x[:16] for x in classes[batch.classes[t][label]]]
        support_texts = {decode(r) for r in s_tokens[t]}
        assert support_texts.isdisjoint({decode(r) for r in q_tokens[t]})
    assert torch.equal(sampler.batch(3, 5).support[0], s_tokens)


def test_episode_sampler_errors():
    with pytest.raises(DataError, match="5-way episodes need at least 5 classes"):
        EpisodeSampler({"a": ["x"] * 10}, n_way=5)
    with pytest.raises(DataError, match=r"'b' \(3\)"):
        EpisodeSampler({"a": [f"x{i}" for i in range(10)], "b": ["y1", "y2", "y3"]}, n_way=2, k_shot=2, n_query=2)


def test_episode_sampler_keeps_each_distinct_text_once():
    """A text repeated in a class, or two texts equal once cut to max_len, is one input: a query input is
    never also a support input of its episode (before, 'hi' twice in a class could be drawn into both)."""
    classes = {"a": ["hi", "hi", "hello", "help me", "hey"], "b": ["no", "nope", "not now", "not yet"]}
    sampler = EpisodeSampler(classes, n_way=2, k_shot=2, n_query=1, max_len=3)
    assert [sampler.tokens[0].shape[0], sampler.tokens[1].shape[0]] == [3, 3]  # a: hi, hel, hey; b: no, nop, not
    assert [decode(row[row != PAD]) for row in sampler.tokens[0]] == ["hi", "hel", "hey"]
    for index in range(50):
        batch = sampler.batch(index, 4)
        for t in range(4):
            support = {tuple(row.tolist()) for row in batch.support[0][t]}
            assert len(support) == 4 and support.isdisjoint(tuple(row.tolist()) for row in batch.query[0][t])
    with pytest.raises(DataError, match=r"fewer than k_shot \+ n_query = 4 distinct texts \(once cut to max_len=3 "
                                         r"characters, .*\): 'a' \(3\), 'b' \(3\)"):
        EpisodeSampler(classes, n_way=2, k_shot=2, n_query=2, max_len=3)
    greek = {"a": ["αβγ", "δεζ", "ηθι", "abc"], "b": ["one", "two", "six", "ten"]}  # the Greek texts read alike
    with pytest.raises(DataError, match=r"every character from U\+00FF up read as one token\): 'a' \(2\)$"):
        EpisodeSampler(greek, n_way=2, k_shot=2, n_query=1, max_len=8)
    longer = EpisodeSampler(classes, n_way=2, k_shot=2, n_query=2, max_len=5)  # "not n" and "not y" differ
    assert [longer.tokens[0].shape[0], longer.tokens[1].shape[0]] == [4, 4]


def test_labelled_folder(tmp_path):
    (tmp_path / "yes.txt").write_text("sure\n\nok\n", encoding="utf-8")
    (tmp_path / "no.txt").write_text("nope\n", encoding="utf-8")
    assert load_labelled_folder(tmp_path) == {"no": ["nope"], "yes": ["sure", "ok"]}
    (tmp_path / "crlf.txt").write_bytes("un\r\ndeux\u2028trois\r\n".encode("utf-8"))
    assert load_labelled_folder(tmp_path)["crlf"] == ["un", "deux\u2028trois"]  # lines as iterating the file
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(invalid continuation byte at byte 3\)"):
        load_labelled_folder(tmp_path)
    (tmp_path / "latin1.txt").unlink()
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(DataError, match="folder.txt: cannot be read"):
        load_labelled_folder(tmp_path)


@needs_clinc
def test_clinc150_loads_150_intents_in_10_domains():
    classes, groups = load_clinc150(CLINC)
    assert len(groups) == 10 and sum(len(v) for v in groups.values()) == 150
    assert all(len(classes[i]) == 150 for v in groups.values() for i in v)
    assert "oos" not in classes or all("oos" not in v for v in groups.values())


def write_clinc(folder, data, domains):
    folder.mkdir(exist_ok=True)
    (folder / "data_full.json").write_text(json.dumps(data))
    (folder / "domains.json").write_text(json.dumps(domains))


@pytest.mark.parametrize("data, domains, message", [
    ({"train": [], "val": []}, {}, r"data_full.json: expected the keys \['train', 'val', 'test'\]"),
    ({"train": [["hi"]], "val": [], "test": []}, {}, r"data_full.json: train\[0\] is \['hi'\]"),
    ({"train": [["hi", "greet"]], "val": [], "test": []}, {"d": ["greet", "bye"]},
     r"domains.json: intents \['bye'\] have no utterances"),
])
def test_clinc150_bad_files_are_named(tmp_path, data, domains, message):
    write_clinc(tmp_path / "c", data, domains)
    with pytest.raises(DataError, match=message):
        load_clinc150(tmp_path / "c")


def test_a_byte_order_mark_is_not_read_as_text(tmp_path):
    """Windows editors start UTF-8 files with U+FEFF: it was the first text's first character (token 255),
    and JSON refused the file."""
    bom = "\ufeff".encode("utf-8")
    (tmp_path / "labelled").mkdir()
    (tmp_path / "labelled" / "yes.txt").write_bytes(bom + "sure\nok\n".encode("utf-8"))
    assert load_labelled_folder(tmp_path / "labelled") == {"yes": ["sure", "ok"]}
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "alpha.txt").write_bytes(bom + b"hello")
    assert folder_domains(tmp_path / "domains") == {"alpha": "hello"}
    write_clinc(tmp_path / "c", {"train": [["hi", "greet"]], "val": [], "test": []}, {"d": ["greet"]})
    for name in ("data_full.json", "domains.json"):
        (tmp_path / "c" / name).write_bytes(bom + (tmp_path / "c" / name).read_bytes())
    assert load_clinc150(tmp_path / "c") == ({"greet": ["hi"]}, {"d": ["greet"]})


def test_clinc150_missing_or_corrupt_file(tmp_path):
    with pytest.raises(DataError, match="data_full.json: file not found"):
        load_clinc150(tmp_path)
    (tmp_path / "data_full.json").write_text("{not json")
    with pytest.raises(DataError, match="data_full.json: not valid JSON"):
        load_clinc150(tmp_path)
    (tmp_path / "data_full.json").write_bytes(b'{"train": "\xff"}')
    with pytest.raises(DataError, match="data_full.json: not UTF-8 text"):
        load_clinc150(tmp_path)

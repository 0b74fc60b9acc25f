"""Zero-shot evaluation through lm-evaluation-harness (semisparse.evaluate.zeroshot).

The offline tasks must ask the model exactly what lm-eval's built-in tasks ask. The reference is
built independently of semisparse: lm-eval's own TaskManager loads the built-in task by name, with
``datasets.load_dataset`` answering its hub request with hand-written documents in the hub data
set's field layout. Our task, built from the local files, must produce the same log-likelihood
requests (context, continuation) and the same gold answers; the two documented differences of the
local files (HellaSwag capitalisation, BoolQ title prefix) are asserted as exactly those differences.

Each such check runs twice (parameter ``data``): on the made-up files of tests/fixture_data.py, whose
hub-layout records are written there by hand (always runs), and on the real standard data with known
records of the real hub data sets written out below (skipped, with the reason, when the data is absent).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import socket
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")
import lm_eval.tasks  # noqa: E402,F811
from lm_eval.tasks import TaskManager  # noqa: E402

import fixture_data as fx  # noqa: E402
from semisparse.errors import UserError  # noqa: E402
from semisparse.evaluate import zeroshot  # noqa: E402
from semisparse.evaluate.zeroshot import KNOWN_TASKS, build_offline_task, load_local_docs, run_zeroshot  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).parent


# ------------------------------------------------------------------ helpers


@pytest.fixture
def no_network(monkeypatch):
    """Fail on (and record) any attempt to open an internet socket or resolve a host name."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access attempted in an offline test: {address}")
        return real_connect(self, address, *args, **kwargs)

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise OSError(f"host lookup attempted in an offline test: {host}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


_REF_MANAGERS: dict[str, TaskManager] = {}


def builtin_task(name, hub_docs, monkeypatch, expect_hub):
    """lm-eval's own built-in task ``name``, loaded by its TaskManager, reading ``hub_docs``.

    Only ``datasets.load_dataset`` is replaced: it checks that the task asks for the expected hub
    data set and returns ``hub_docs`` for every split.
    """
    folder = zeroshot.TASKS[name].lm_eval_dir
    if folder not in _REF_MANAGERS:
        _REF_MANAGERS[folder] = TaskManager(include_defaults=False, include_path=str(LM_EVAL_TASKS / folder))
    calls = []

    def fake_load_dataset(path=None, name=None, **kwargs):
        calls.append((path, name))
        ds = datasets.Dataset.from_list(hub_docs)
        return datasets.DatasetDict({"train": ds, "validation": ds, "test": ds})

    with monkeypatch.context() as patch:
        patch.setattr(datasets, "load_dataset", fake_load_dataset)
        task = _REF_MANAGERS[folder].load([name])["tasks"][name]
    assert calls == [expect_hub]
    return task


def requests_and_gold(task, n):
    """Per document: the (context, continuation) requests the harness builds, and the gold answer."""
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=n, rank=0, world_size=1)
    per_doc = defaultdict(list)
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        per_doc[inst.doc_id].append(tuple(inst.arguments))
    docs = list(task.eval_docs)[:n]
    gold = []
    for doc in docs:
        g = task.doc_to_target(doc)
        if task.multiple_input:  # winogrande: the gold is the index of the right context
            g = (task.doc_to_text(doc), g)
        gold.append(g)
    assert sorted(per_doc) == list(range(n))
    return [per_doc[i] for i in range(n)], gold


def our_task(name, root, indices):
    docs = load_local_docs(name, root)
    return build_offline_task(name, [docs[i] for i in indices], source="test")


@pytest.fixture(params=["fixture", "standard"])
def data(request):
    """(kind, folder): the made-up fixture files, or the real standard data (skipped when absent)."""
    if request.param == "fixture":
        return "fixture", request.getfixturevalue("fixture_data")
    return "standard", request.getfixturevalue("shared_data")


def task_params(names):
    """Task names as parameters, each marked with the standard files it reads (for the skip of ``shared_data``)."""
    return [pytest.param(n, marks=pytest.mark.standard_data(*zeroshot.TASKS[n].files)) for n in names]


def missing_ok():
    """Keyword that lets run_zeroshot report absent task files instead of raising, where it has one."""
    return {"skip_missing": True} if "skip_missing" in inspect.signature(run_zeroshot).parameters else {}


def raw_jsonl(path: Path, index: int) -> dict:
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i == index:
                return json.loads(line)
    raise IndexError(index)


# ------------------------------------------------------------------ reference documents
# Records of the real hub data sets the built-in tasks read, written out in the hub layout, for
# documents of the real local files at the given indices. Ids are not used by any prompt.
# (For the fixture files the hand-written records are fixture_data.HUB.)

ARC_HUB = [
    (0, {"id": "Mercury_417466",
         "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
         "choices": {"text": ["Sunlight is the source of energy for nearly all ecosystems.",
                              "Most ecosystems are found on land instead of in water.",
                              "Carbon dioxide is more available than other gases.",
                              "The producers in all ecosystems are plants."],
                     "label": ["A", "B", "C", "D"]},
         "answerKey": "A"}),
    (14, {"id": "NYSEDREGENTS_2015_8_28", "question": "All living and nonliving material is composed of",
          "choices": {"text": ["air", "elements", "water", "soil"], "label": ["1", "2", "3", "4"]},
          "answerKey": "2"}),
    (93, {"id": "NYSEDREGENTS_2008_4_6",
          "question": "When a rock is placed in a graduated cylinder containing water, the height of the water will",
          "choices": {"text": ["decrease", "increase", "remain the same"], "label": ["A", "B", "C"]},
          "answerKey": "B"}),
    (500, {"id": "TIMSS_2003_4_pg35", "question": "What gas in the air do we need to breathe in order to live?",
           "choices": {"text": ["nitrogen", "oxygen", "carbon dioxide", "hydrogen", "water vapor"],
                       "label": ["A", "B", "C", "D", "E"]},
           "answerKey": "B"}),
]

ARC_CHALLENGE_HUB = [  # one item labelled 1-4, one with 3 choices, one with 5
    (0, {"id": "Mercury_7175875",
         "question": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
                     "likely effect of this increase in rotation?",
         "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                              "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                     "label": ["A", "B", "C", "D"]},
         "answerKey": "C"}),
    (44, {"id": "NYSEDREGENTS_2008_8_34",
          "question": "Which statement best describes the energy changes that occur while a child is riding on a sled "
                      "down a steep, snow-covered hill?",
          "choices": {"text": ["Kinetic energy decreases and potential energy increases.",
                               "Kinetic energy increases and potential energy decreases.",
                               "Both potential energy and kinetic energy decrease.",
                               "Both potential energy and kinetic energy increase."],
                      "label": ["1", "2", "3", "4"]},
          "answerKey": "2"}),
    (121, {"id": "NYSEDREGENTS_2010_4_4",
           "question": "A toy truck rolls over a smooth surface. If the surface is covered with sand, the truck will "
                       "most likely roll",
           "choices": {"text": ["slower", "faster", "at the same speed"], "label": ["A", "B", "C"]},
           "answerKey": "A"}),
    (836, {"id": "TIMSS_1995_8_J7", "question": "How are warm-blooded animals different from cold-blooded animals?",
           "choices": {"text": ["Warm-blooded animals have a higher metabolism in warm weather.",
                                "Warm-blooded animals are more aggressive in captivity.",
                                "Warm-blooded animals always have a higher blood temperature.",
                                "Warm-blooded animals normally maintain a fairly constant internal temperature at all "
                                "air temperatures.",
                                "Warm-blooded animals are found only in warm climates."],
                       "label": ["A", "B", "C", "D", "E"]},
           "answerKey": "D"}),
]

HELLASWAG_HUB = [
    (0, {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
         "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"}),
    (1, {"ind": 92, "activity_label": "Clean and jerk",
         "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.", "ctx_b": "the lady",
         "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady",
         "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                     "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
         "source_id": "activitynet~v_-lJS58hyo1c", "split": "val", "split_type": "zeroshot", "label": "3"}),
]

PIQA_HUB = [
    (0, {"goal": "How do I ready a guinea pig cage for it's new occupants?",
         "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
                 "you will also need to supply it with a water bottle and a food dish.",
         "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, "
                 "you will also need to supply it with a water bottle and a food dish.",
         "label": 0}),
    (1, {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin ",
         "label": 1}),
]

WINOGRANDE_HUB = [
    (0, {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"}),
    (1, {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"}),
]

RTE_HUB = [
    (0, {"sentence1": "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
                      "according to the Christopher Reeve Foundation.",
         "sentence2": "Christopher Reeve had an accident.", "label": 1, "idx": 0}),
    (1, {"sentence1": "Yet, we now are discovering that antibiotics are losing their effectiveness against illness. "
                      "Disease-causing bacteria are mutating faster than we can come up with new antibiotics to fight "
                      "the new variations.",
         "sentence2": "Bacteria is winning the war against antibiotics.", "label": 0, "idx": 1}),
]

OPENBOOKQA_HUB = [
    (0, {"id": "8-343",
         "question_stem": "A person wants to start saving money so that they can afford a nice vacation at the end "
                          "of the year. After looking over their budget and expenses, they decide the best way to "
                          "save money is to",
         "choices": {"text": ["make more phone calls", "quit eating lunch out", "buy less with monopoly money",
                              "have lunch with friends"],
                     "label": ["A", "B", "C", "D"]},
         "answerKey": "B"}),
    (2, {"id": "unused", "question_stem": "Predators eat",
         "choices": {"text": ["lions", "humans", "bunnies", "grass"], "label": ["A", "B", "C", "D"]},
         "answerKey": "C"}),
]

COPA_HUB = [  # SuperGLUE COPA: capitalised choices, premise with its period
    (0, {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
         "choice2": "Water flowed from the spout.", "question": "effect", "idx": 0, "label": 1}),
    (4, {"premise": "The hamburger meat browned.", "choice1": "The cook froze it.", "choice2": "The cook grilled it.",
         "question": "cause", "idx": 4, "label": 1}),
    (5, {"premise": "I doubted the salesman's pitch.", "choice1": "I turned his offer down.",
         "choice2": "He persuaded me to buy the product.", "question": "effect", "idx": 5, "label": 0}),
]


def _boolq_hub(shared_data):
    # First SuperGLUE BoolQ validation record: its passage starts with the Wikipedia title "Ethanol fuel -- ";
    # the local file keeps the same passage without that prefix (long text: read from the raw line).
    raw = raw_jsonl(shared_data / "boolq/boolq_dev_question_passage_label.jsonl", 0)
    assert raw["question"] == "does ethanol take more energy make that produces" and raw["label"] is False
    return [(0, {"question": raw["question"], "passage": "Ethanol fuel -- " + raw["passage"], "idx": 0, "label": 0})]


def _lambada_hub(shared_data):
    raw = raw_jsonl(shared_data / "lambada_openai/lambada_test.jsonl", 0)
    assert raw["text"].endswith("I don't care about signs")
    return [(0, {"text": raw["text"]})]


def _same(ref_ctx, hub_doc):
    return ref_ctx


def _hellaswag_lowercase(ref_ctx, hub_doc):
    # lm-eval capitalises ctx_b ("... roof. He"); the local file keeps it as is ("... roof. he").
    b = hub_doc["ctx_b"]
    assert ref_ctx.endswith(b.capitalize()) and b != b.capitalize()
    return ref_ctx[: -len(b)] + b


def _boolq_no_title(ref_ctx, hub_doc):
    # The SuperGLUE passage is "<title> -- <passage>"; the local file has only <passage>.
    title = hub_doc["passage"].split(" -- ")[0] + " -- "
    assert ref_ctx.startswith(title) and len(title) > len(" -- ")
    return ref_ctx[len(title):]


CASES = {
    # name: (real hub documents, (hub path, hub name) the built-in task loads, expected context of ours from the reference's)
    "arc_easy": (lambda d: ARC_HUB, ("allenai/ai2_arc", "ARC-Easy"), _same),
    "arc_challenge": (lambda d: ARC_CHALLENGE_HUB, ("allenai/ai2_arc", "ARC-Challenge"), _same),
    "hellaswag": (lambda d: HELLASWAG_HUB, ("Rowan/hellaswag", None), _hellaswag_lowercase),
    "piqa": (lambda d: PIQA_HUB, ("baber/piqa", None), _same),
    "winogrande": (lambda d: WINOGRANDE_HUB, ("allenai/winogrande", "winogrande_xl"), _same),
    "boolq": (_boolq_hub, ("aps/super_glue", "boolq"), _boolq_no_title),
    "rte": (lambda d: RTE_HUB, ("nyu-mll/glue", "rte"), _same),
    "openbookqa": (lambda d: OPENBOOKQA_HUB, ("allenai/openbookqa", "main"), _same),
    "lambada_openai": (_lambada_hub, ("EleutherAI/lambada_openai", "default"), _same),
    "copa": (lambda d: COPA_HUB, ("aps/super_glue", "copa"), _same),
}


def test_every_task_with_local_data_has_a_reference_case():
    assert set(CASES) == set(KNOWN_TASKS)
    assert set(fx.HUB) == set(KNOWN_TASKS) and set(fx.COUNTS) == set(KNOWN_TASKS)
    assert {n: len(docs) for n, docs in fx.HUB.items()} == fx.COUNTS  # a hub record for every fixture item


@pytest.mark.parametrize("name", task_params(sorted(CASES)))
def test_offline_requests_equal_builtin_task(name, data, monkeypatch):
    kind, root = data
    hub_docs_fn, hub_id, expected_ctx = CASES[name]
    indexed = hub_docs_fn(root) if kind == "standard" else list(enumerate(fx.HUB[name]))
    indices = [i for i, _ in indexed]
    hub_docs = [d for _, d in indexed]
    ref = builtin_task(name, hub_docs, monkeypatch, hub_id)
    ours = our_task(name, root, indices)

    # same task definition: output type, metrics, delimiters, harness version
    for key in ("output_type", "target_delimiter", "fewshot_delimiter", "metric_list", "doc_to_choice", "description"):
        assert str(ours.config[key]) == str(ref.config[key]), key
    assert ours.VERSION == ref.VERSION

    n = len(hub_docs)
    ref_reqs, ref_gold = requests_and_gold(ref, n)
    our_reqs, our_gold = requests_and_gold(ours, n)
    assert our_gold == ref_gold
    for doc, ref_doc_reqs, our_doc_reqs in zip(hub_docs, ref_reqs, our_reqs):
        expected = [(expected_ctx(ctx, doc), cont) for ctx, cont in ref_doc_reqs]
        assert our_doc_reqs == expected
        if expected_ctx is not _same:  # the documented difference is real, not vacuous
            assert our_doc_reqs != ref_doc_reqs


def _hellaswag_preprocess(text):
    """lm-eval's hellaswag/utils.py ``preprocess`` (applied to the query and each ending), written out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _spec(name, root, n):
    """Requests and gold answers for the first n local documents, written from the built-in YAMLs' formulas."""
    d = root
    if name in ("arc_easy", "arc_challenge"):
        file = {"arc_easy": "arc_easy/ARC-Easy-Test.jsonl", "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl"}[name]
        rows = [raw_jsonl(d / file, i) for i in range(n)]
        return [([(f"Question: {r['question']['stem']}\nAnswer:", " " + c["text"]) for c in r["question"]["choices"]],
                 [c["label"] for c in r["question"]["choices"]].index(r["answerKey"])) for r in rows]
    if name == "piqa":
        labels = (d / "piqa/valid-labels.lst").read_text().split()
        rows = [raw_jsonl(d / "piqa/valid.jsonl", i) for i in range(n)]
        return [([(f"Question: {r['goal']}\nAnswer:", " " + r[s]) for s in ("sol1", "sol2")], int(labels[i]))
                for i, r in enumerate(rows)]
    if name == "winogrande":
        out = []
        for i in range(n):
            r = raw_jsonl(d / "winogrande/dev.jsonl", i)
            cut = r["sentence"].index("_")
            cont = " " + r["sentence"][cut + 1:].strip()
            out.append(([(r["sentence"][:cut] + r[o], cont) for o in ("option1", "option2")],
                        (int(r["answer"]) - 1, cont[1:])))
        return out
    if name == "boolq":
        rows = [raw_jsonl(d / "boolq/boolq_dev_question_passage_label.jsonl", i) for i in range(n)]
        return [([(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", c) for c in (" no", " yes")], int(r["label"]))
                for r in rows]
    if name == "rte":
        rows = [raw_jsonl(d / "rte/rte_validation.jsonl", i) for i in range(n)]
        return [([(f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:", c) for c in (" True", " False")],
                  r["label"]) for r in rows]
    if name == "openbookqa":
        rows = [raw_jsonl(d / "openbookqa/llmfoundry_openbook_qa.jsonl", i) for i in range(n)]
        return [([(r["query"], " " + c) for c in r["choices"]], r["gold"]) for r in rows]
    if name == "lambada_openai":
        rows = [raw_jsonl(d / "lambada_openai/lambada_test.jsonl", i) for i in range(n)]
        return [([(" ".join(r["text"].split(" ")[:-1]), " " + r["text"].split(" ")[-1])], " " + r["text"].split(" ")[-1])
                for r in rows]
    if name == "copa":
        rows = [raw_jsonl(d / "copa/llmfoundry_copa.jsonl", i) for i in range(n)]
        out = []
        for r in rows:
            ctx = r["query"].replace(", because", " because").replace(", therefore", " therefore")
            conts = [" " + c for c in r["choices"]]  # the built-in doc_to_choice adds a leading space...
            # ...and the harness adds target_delimiter " " in front: lm-eval's copa really asks for "  the ..."
            out.append(([(ctx, " " + c) for c in conts], conts[r["gold"]]))
        return out
    if name == "hellaswag":
        lines = (d / "hellaswag/hellaswag_val_full.txt").read_text(encoding="utf-8").split("\n")
        pre = _hellaswag_preprocess
        return [([(pre(lines[6 * i]), " " + pre(e)) for e in lines[6 * i + 2: 6 * i + 6]], lines[6 * i + 1])
                for i in range(n)]
    raise AssertionError(name)


@pytest.mark.parametrize("name", task_params(sorted(CASES)))
def test_offline_requests_match_builtin_formulas_on_more_documents(name, data):
    kind, root = data
    n = 20 if kind == "standard" else fx.COUNTS[name]  # the fixture files: every item
    ours = build_offline_task(name, load_local_docs(name, root)[:n], source="test")
    reqs, gold = requests_and_gold(ours, n)
    spec = _spec(name, root, n)
    assert reqs == [s[0] for s in spec]
    norm = {"hellaswag": str, "winogrande": lambda g: (g[0], g[1])}.get(name, lambda g: g)
    assert [norm(g) for g in gold] == [s[1] for s in spec]


@pytest.mark.standard_data("hellaswag/hellaswag_val_full.txt")
def test_hellaswag_bracket_artefacts_are_removed_like_lm_eval(shared_data):
    docs = load_local_docs("hellaswag", shared_data)
    raw = (shared_data / "hellaswag/hellaswag_val_full.txt").read_text(encoding="utf-8").split("\n")
    assert "[www.kiddio.org]" in raw[6 * 3505]
    task = build_offline_task("hellaswag", docs[3505:3506], source="test")
    (reqs,), _ = requests_and_gold(task, 1)
    assert "Visit a site like to find loads" in reqs[0][0] and "[" not in reqs[0][0]


def test_hellaswag_bracket_artefacts_are_removed_on_fixture(fixture_data):
    raw = (fixture_data / "hellaswag/hellaswag_val_full.txt").read_text(encoding="utf-8").split("\n")
    assert " [title] " in raw[6] and "[substeps]" in raw[6 + 3] and "[www.example.org]" in raw[12]
    task = build_offline_task("hellaswag", load_local_docs("hellaswag", fixture_data)[1:3], source="test")
    (title_reqs, link_reqs), _ = requests_and_gold(task, 2)
    # " [title]" becomes ". ", any other [...] goes, double spaces close up; ctx_b stays lower-case
    assert title_reqs[0][0] == "Home and Garden: How to water a fern. Check the soil with your finger. if the top feels dry,"
    assert [cont for _, cont in title_reqs] == [" pour water slowly at the base of the plant.",
                                               " paint the leaves with a thin brush.", " bury the fern in sand.",
                                               " put the fern in the freezer overnight."]
    assert link_reqs[0][0] == ("Family Life: How to plan a picnic. Pack a blanket and some fruit.. Look up a park on to "
                               "find one nearby. choose")


@pytest.mark.standard_data(*(f for spec in zeroshot.TASKS.values() for f in spec.files))
def test_local_document_counts(shared_data):
    counts = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
              "boolq": 3270, "rte": 277, "openbookqa": 500, "lambada_openai": 5153, "copa": 100}
    for name, n in counts.items():
        assert len(load_local_docs(name, shared_data)) == n, name


def test_local_document_counts_of_fixture_files(fixture_data):
    for name, n in fx.COUNTS.items():
        assert len(load_local_docs(name, fixture_data)) == n, name


def test_absent_task_files_load_as_none(tmp_path):
    assert load_local_docs("arc_challenge", tmp_path) is None


# ------------------------------------------------------------------ running through the harness


@pytest.mark.standard_data("arc_easy/ARC-Easy-Test.jsonl", "winogrande/dev.jsonl", "lambada_openai/lambada_test.jsonl")
def test_run_zeroshot_scores_come_from_the_harness(llama, tokenizer, data, no_network):
    kind, root = data
    tasks = ["arc_easy", "winogrande", "lambada_openai"]
    res = run_zeroshot(llama, tokenizer, tasks, task_data=root, limit=3, batch_size=4, log_samples=True)
    assert res["mode"] == "offline" and res["missing"] == [] and res["limit"] == 3
    assert list(res["tasks"]) == tasks
    totals = ({"arc_easy": 2376, "winogrande": 1267, "lambada_openai": 5153} if kind == "standard"
              else {t: fx.COUNTS[t] for t in tasks})
    for name in tasks:
        entry = res["tasks"][name]
        assert entry["n_docs"] == 3 and entry["n_docs_total"] == totals[name]
        assert 0.0 <= entry["acc"] <= 1.0
        assert entry["acc_stderr"] is not None and entry["acc_stderr"] >= 0
        samples = res["samples"][name]
        assert [s["doc_id"] for s in samples] == [0, 1, 2]
        assert entry["acc"] == pytest.approx(sum(s["acc"] for s in samples) / 3)
    assert ("acc_norm" in res["tasks"]["arc_easy"]) and ("acc_norm" not in res["tasks"]["winogrande"])
    assert "perplexity" in res["tasks"]["lambada_openai"]
    assert res["mean_acc_over"] == tasks
    assert res["mean_acc"] == pytest.approx(sum(res["tasks"][t]["acc"] for t in tasks) / 3)

    # the harness scored the requests the adapter builds, and acc is its argmax over log-likelihoods
    spec = _spec("arc_easy", root, 3)
    for s, (reqs, gold) in zip(res["samples"]["arc_easy"], spec):
        assert [tuple(a) for a in s["arguments"]] == reqs
        lls = [ll for ll, _ in s["loglikelihoods"]]
        assert s["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == gold)
    for s in res["samples"]["lambada_openai"]:
        assert s["acc"] == float(s["loglikelihoods"][0][1])  # greedy match of the last word
    json.dumps(res)  # the result is plain JSON


def test_missing_task_files_are_reported(llama, tokenizer, fixture_data, tmp_path, no_network):
    (tmp_path / "copa").symlink_to(fixture_data / "copa", target_is_directory=True)
    res = run_zeroshot(llama, tokenizer, ["copa", "arc_challenge", "piqa"], task_data=tmp_path, limit=2, **missing_ok())
    assert res["missing"] == ["arc_challenge", "piqa"]
    assert res["missing_files"]["piqa"] == [str(tmp_path / "piqa/valid.jsonl"), str(tmp_path / "piqa/valid-labels.lst")]
    assert list(res["tasks"]) == ["copa"] and res["tasks"]["copa"]["n_docs"] == 2
    assert res["mean_acc_over"] == ["copa"] and res["mean_acc"] == res["tasks"]["copa"]["acc"]
    # (when every task asked for is missing: the zero-shot module's own tests, as that behaviour is its to define)


def _harness_must_not_run(monkeypatch):
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: pytest.fail("the harness ran despite missing files"))


def test_missing_task_files_are_an_error_unless_skipped(llama, tokenizer, fixture_data, tmp_path, monkeypatch):
    _harness_must_not_run(monkeypatch)
    (tmp_path / "copa").symlink_to(fixture_data / "copa", target_is_directory=True)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa/valid.jsonl").write_bytes((fixture_data / "piqa/valid.jsonl").read_bytes())  # labels absent
    with pytest.raises(UserError) as err:
        run_zeroshot(llama, tokenizer, ["copa", "arc_challenge", "piqa"], task_data=tmp_path, limit=2)
    assert str(err.value) == (
        f"zero-shot task files missing in {tmp_path}: arc_challenge (arc_challenge/ARC-Challenge-Test.jsonl); "
        "piqa (piqa/valid-labels.lst); add them, leave those tasks out, or pass --skip-missing to score the others"
    )


@pytest.mark.parametrize("skip_missing", [False, True])
def test_asking_only_for_missing_tasks_is_always_an_error(llama, tokenizer, tmp_path, monkeypatch, skip_missing):
    _harness_must_not_run(monkeypatch)
    with pytest.raises(UserError) as err:
        run_zeroshot(llama, tokenizer, ["arc_challenge", "piqa"], task_data=tmp_path, skip_missing=skip_missing)
    assert str(err.value) == (
        f"no files in {tmp_path} for the zero-shot task(s) asked for: arc_challenge "
        "(arc_challenge/ARC-Challenge-Test.jsonl); piqa (piqa/valid.jsonl, piqa/valid-labels.lst)"
    )


def test_evaluate_checks_task_files_before_loading_the_model(tmp_path, monkeypatch):
    from semisparse import api

    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa/llmfoundry_copa.jsonl").write_text('{"query": "x, therefore", "gold": 0, "choices": ["a", "b"]}\n')
    with pytest.raises(UserError, match=r"zero-shot task files missing in .*: piqa \(piqa/valid.jsonl, "):
        api.evaluate("default", tasks=["copa", "piqa"], task_data=str(tmp_path), out=tmp_path / "r.json")
    with pytest.raises(UserError, match="no files in"):
        api.evaluate("default", tasks=["piqa"], task_data=str(tmp_path), skip_missing=True, out=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tasks": ["arc_easy", "mmlu"]}, r"unknown zero-shot task.*'mmlu'.*known tasks: .*hellaswag.*arc_easy.*copa"),
        ({"tasks": []}, "no zero-shot tasks"),
        ({"tasks": ["copa"], "limit": 0}, "limit must be a positive"),
        ({"tasks": ["copa"], "limit": -3}, "limit must be a positive"),
        ({"tasks": ["copa"], "task_data": "/nonexistent/zeroshot-data"}, "task data folder not found"),
    ],
)
def test_bad_arguments_raise_user_error(llama, tokenizer, kwargs, match):
    with pytest.raises(UserError, match=match) as err:
        run_zeroshot(llama, tokenizer, **kwargs)
    assert "\n" not in str(err.value)


def test_malformed_local_file_is_a_user_error(llama, tokenizer, tmp_path):
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa/llmfoundry_copa.jsonl").write_text('{"query": "x, therefore", "gold": 0, "choices": ["a", "b"]}\n{oops\n')
    with pytest.raises(UserError, match=r"llmfoundry_copa.jsonl:2: not valid JSON"):
        run_zeroshot(llama, tokenizer, ["copa"], task_data=tmp_path)


def test_online_mode_hands_builtin_task_names_to_the_harness(llama, tokenizer, monkeypatch):
    seen = {}

    def fake_simple_evaluate(**kwargs):
        seen.update(kwargs)
        return {
            "results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                     "acc_norm,none": 0.25, "acc_norm_stderr,none": 0.1},
                        "piqa": {"alias": "piqa", "acc,none": 0.75, "acc_stderr,none": "N/A",
                                 "acc_norm,none": 0.5, "acc_norm_stderr,none": 0.1}},
            "n-samples": {"arc_easy": {"original": 2376, "effective": 2376}, "piqa": {"original": 1838, "effective": 1838}},
        }

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    res = run_zeroshot(llama, tokenizer, ["arc_easy", "piqa"])
    assert seen["tasks"] == ["arc_easy", "piqa"] and seen["num_fewshot"] == 0 and seen["limit"] is None
    for name in ("arc_easy", "piqa"):
        path = Path(seen["task_manager"].task_index[name].yaml_path)
        assert path.is_relative_to(LM_EVAL_TASKS)
    assert res["mode"] == "online" and res["missing"] == []
    assert res["tasks"]["arc_easy"]["source"] == "hub:allenai/ai2_arc/ARC-Easy"
    assert res["tasks"]["piqa"]["acc_stderr"] is None
    assert res["mean_acc"] == pytest.approx(0.625)
    assert math.isclose(res["tasks"]["arc_easy"]["n_docs"], 2376)

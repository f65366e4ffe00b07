"""The benchmark tasks beyond multiple choice: loaders over each dataset's original format, the metrics against
hand-computed values, few-shot prompts, sharded decoding, and every task end to end with a tiny model."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, hf_tiny_config, shared_data
from transformers import BertConfig, BertModel, BertTokenizer, LlamaForCausalLM

from mellama_jax.data.corpus import BadRecord
from mellama_jax.eval.rescore import RescoreRequest, rescore
from mellama_jax.eval.run import EvalRequest, evaluate, few_shot_prefix
from mellama_jax.eval.scoring import bertscore, bertscore_identity, summary_metrics
from mellama_jax.eval.tasks import load_task, load_templates

# Stand-ins for the authors' templates file (the real one is in ../shared; CI-independent tests use these).
TEMPLATES = {
    "MedNLI": {"choices": ["entailment", "contradiction", "neutral"], "prompt": "NLI\nINPUT: {text}\nOUTPUT:\n"},
    "DDI2013": {
        "choices": ["DDI-effect", "DDI-mechanism", "DDI-advise", "DDI-false", "DDI-int"],
        "prompt": "DDI\nINPUT: {text}\nOUTPUT:\n",
    },
    "MTSample": {"choices": ["Surgery", "Cosmetic / Plastic Surgery", "Radiology"], "prompt": "MT {text}\nOUTPUT:\n"},
    "HoC": {
        "choices": [
            "sustaining proliferative signaling",
            "evading growth suppressors",
            "resisting cell death",
            "enabling replicative immortality",
            "inducing angiogenesis",
            "activating invasion and metastasis",
            "genomic instability and mutation",
            "tumor promoting inflammation",
            "cellular energetics",
            "avoiding immune destruction",
        ],
        "prompt": "HoC\nINPUT: {text}\nOUTPUT:\n",
    },
    "EmrQA": {"prompt": "Context: {text}\nQuestion {question}\nAnswer:\n"},
    "PubmedSumm": {"prompt": "Input: {text}\nOutput:\n"},
    "PubMed_Summ": {"prompt": "Title for: {text}\nOUTPUT:\n"},
    "MIMIC_SUM": {"prompt": "Impression from: {text}\nOUTPUT:\n"},
}


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "prompt_templates.json"
    path.write_text(json.dumps(TEMPLATES))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One small file per dataset, in that dataset's original layout."""
    d = tmp_path_factory.mktemp("datasets")
    with open(d / "mli_test_v1.jsonl", "w") as f:
        for i, label in enumerate(["entailment", "neutral", "contradiction"]):
            f.write(
                json.dumps(
                    {
                        "sentence1": f"Patient {i} has fever.",
                        "sentence2": "The patient is febrile.",
                        "gold_label": label,
                        "pairID": f"p{i}",
                    }
                )
                + "\n"
            )
    with open(d / "bionli_test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["supp_set", "conclusion", "label_cat"])
        w.writeheader()
        w.writerow(
            {"supp_set": "Drug X lowered blood pressure.", "conclusion": "X is antihypertensive.", "label_cat": "pos"}
        )
        w.writerow({"supp_set": "Drug Y had no effect.", "conclusion": "Y lowers pressure.", "label_cat": "neg"})
    (d / "ddi_test.tsv").write_text(
        "index\tsentence\tlabel\n"
        "d1\t@DRUG$ increases the levels of @DRUG$.\tDDI-mechanism\n"
        "d2\tAvoid @DRUG$ with @DRUG$.\tDDI-advise\n"
    )
    with open(d / "mtsamples.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["", "description", "medical_specialty", "sample_name", "transcription", "keywords"])
        w.writeheader()
        w.writerow({"": 0, "medical_specialty": " Radiology", "transcription": "CT of the chest was obtained."})
        w.writerow({"": 1, "medical_specialty": " Surgery", "transcription": "The patient underwent appendectomy."})
    (d / "hoc_test.tsv").write_text(
        "index\tsentence\tlabels\n"
        "h1\tTumour cells evade apoptosis.\t0_0,1_0,2_1,3_0,4_1,5_0,6_0,7_0,8_0,9_0\n"
        "h2\tNo hallmark here.\t\n"
    )
    (d / "emrqa.json").write_text(
        json.dumps(
            {
                "data": [
                    {
                        "title": "note-1",
                        "paragraphs": [
                            {
                                "note_id": "1",
                                "context": ["Patient was started on aspirin 81 mg daily .", "No known allergies ."],
                                "qas": [
                                    {
                                        "id": "q1",
                                        "question": ["What dose of aspirin was given ?", "Aspirin dose ?"],
                                        "answers": [{"text": "aspirin 81 mg daily", "answer_start": [0, 4]}],
                                    }
                                ],
                            }
                        ],
                    }
                ]
            }
        )
    )
    (d / "emrqa.jsonl").write_text(
        json.dumps(
            {"id": "q2", "context": "BP 120/80 .", "question": "BP ?", "answers": [{"text": "120/80"}, "BP 120/80"]}
        )
        + "\n"
    )
    (d / "i2b2" / "txt").mkdir(parents=True)
    (d / "i2b2" / "concept").mkdir()
    (d / "i2b2" / "txt" / "r1.txt").write_text("He has chest pain .\nA CT scan showed no bleed .\n")
    (d / "i2b2" / "concept" / "r1.con").write_text(
        'c="chest pain" 1:2 1:3||t="problem"\nc="a ct scan" 2:0 2:2||t="test"\nc="bleed" 2:5 2:5||t="problem"\n'
    )
    (d / "i2b2.conll").write_text(
        "He O\nhas O\nchest B-problem\npain I-problem\n. O\n\n"
        "A B-test\nCT I-test\nscan I-test\nshowed O\nno O\nbleed B-problem\n. O\n"
    )
    with open(d / "pubmed_test.jsonl", "w") as f:
        f.write(
            json.dumps(
                {
                    "article_id": "PMC1",
                    "article_text": ["We studied mice .", "Mice grew ."],
                    "abstract_text": ["<S> mice were studied . </S>", "<S> they grew . </S>"],
                }
            )
            + "\n"
        )
    (d / "cxr" / "p10" / "s1").mkdir(parents=True)
    (d / "cxr" / "p10" / "s1.txt").write_text(
        "FINAL REPORT\n EXAMINATION: CHEST PA AND LAT\n FINDINGS: The lungs are clear. No effusion.\n\n"
        " IMPRESSION: No acute cardiopulmonary process.\n"
    )
    (d / "cxr" / "p10" / "s2.txt").write_text("FINAL REPORT\n IMPRESSION: Stable.\n")  # no findings: skipped
    return d


def test_loaders_read_the_original_layouts(templates, files):
    t = load_templates(templates)
    _, ex, _ = load_task("mednli", files / "mli_test_v1.jsonl", t)
    assert [e.gold for e in ex] == ["entailment", "neutral", "contradiction"] and ex[0].id == "p0"
    # the authors' MedNLI input (preprocess_instruct.py): "[PRE] " + sentence1 + " [HYP] " + sentence2
    assert ex[0].fields["text"] == "[PRE] Patient 0 has fever. [HYP] The patient is febrile."
    _, ex, entry = load_task("bionli", files / "bionli_test.csv", t)  # our template, package-supplied
    assert [e.gold for e in ex] == ["entailment", "contradiction"] and entry["choices"] == [
        "entailment",
        "contradiction",
    ]
    _, ex, _ = load_task("ddi", files / "ddi_test.tsv", t)
    assert [(e.id, e.gold) for e in ex] == [("d1", "DDI-mechanism"), ("d2", "DDI-advise")]
    _, ex, _ = load_task("mtsample", files / "mtsamples.csv", t)
    assert [e.gold for e in ex] == ["Radiology", "Surgery"]
    _, ex, _ = load_task("hoc", files / "hoc_test.tsv", t)
    # BLUE numbers HoC labels by its own alphabetical list (BLUE_Benchmark blue/eval_hoc.py LABELS):
    # 2 = cellular energetics, 4 = evading growth suppressors. Gold kept in the template's order.
    assert ex[0].gold == ["evading growth suppressors", "cellular energetics"] and ex[1].gold == []
    assert ex[0].answer == "evading growth suppressors; cellular energetics"
    _, ex, _ = load_task("emrqa", files / "emrqa.json", t)
    assert ex[0].gold == ["aspirin 81 mg daily"] and ex[0].fields["question"] == "What dose of aspirin was given ?"
    assert ex[0].fields["text"].startswith("Patient was started") and "\nNo known allergies" in ex[0].fields["text"]
    _, ex, _ = load_task("emrqa", files / "emrqa.jsonl", t)
    assert ex[0].gold == ["120/80", "BP 120/80"] and ex[0].answer == "120/80" and ex[0].fields["question"] == "BP ?"
    _, from_dir, _ = load_task("i2b2", files / "i2b2", t)
    _, from_conll, _ = load_task("i2b2", files / "i2b2.conll", t)
    assert [e.gold for e in from_dir] == [e.gold for e in from_conll]
    # the gold as the authors' NER scorer reads it: the sentence with concepts in <span class="type">
    assert from_dir[1].gold == '<span class="test">A CT scan</span> showed no <span class="problem">bleed</span> .'
    assert from_dir[1].answer == from_dir[1].gold
    _, ex, _ = load_task("pubmedsum", files / "pubmed_test.jsonl", t)
    assert ex[0].gold == "mice were studied . they grew ." and ex[0].fields["text"] == "We studied mice . Mice grew ."
    _, ex, _ = load_task("mimic-cxr", files / "cxr", t)
    assert len(ex) == 1 and ex[0].fields["text"] == "The lungs are clear. No effusion."
    assert ex[0].gold == "No acute cardiopulmonary process."


def test_bad_files_name_the_record(templates, files, tmp_path):
    t = load_templates(templates)
    bad = tmp_path / "ddi.tsv"
    bad.write_text("index\tsentence\tlabel\nd1\ttext\tDDI-effect\nd2\ttext\tDDI-unknown\n")
    with pytest.raises(BadRecord, match=r"ddi.tsv:3: label 'DDI-unknown'"):
        load_task("ddi", bad, t)
    (tmp_path / "i2b2" / "txt").mkdir(parents=True)
    (tmp_path / "i2b2" / "concept").mkdir()
    (tmp_path / "i2b2" / "txt" / "a.txt").write_text("one line .\n")
    (tmp_path / "i2b2" / "concept" / "a.con").write_text('c="x" 1:0 1:0||t="test"\nc="y" 3:0 3:1||t="test"\n')
    with pytest.raises(BadRecord, match=r"a.con:2: offsets 3:0-1 fall outside a.txt"):
        load_task("i2b2", tmp_path / "i2b2", t)
    with pytest.raises(BadRecord, match="no 'HoC' entry"):
        load_task("hoc", files / "hoc_test.tsv", load_templates(None))


def _tiny_bert(path, words, layers):
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(path / "vocab.txt"), model_max_length=512).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(words), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(path)
    return path


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "dog", "ran", "on", "mat"]


def test_bertscore_with_a_local_model(tmp_path):
    model = _tiny_bert(tmp_path / "tiny-bert", WORDS, 2)
    same = bertscore(["the cat sat on the mat"], ["the cat sat on the mat"], str(model))
    other = bertscore(["the dog ran"], ["the cat sat on the mat"], str(model))
    # not the paper's model: reported under its own name, never as the paper's bertscore_f1
    assert "bertscore_f1" not in same and same["bertscore_f1[tiny-bert]"] == pytest.approx(1.0, abs=1e-5)
    assert other["bertscore_f1[tiny-bert]"] < 0.999 and other["bertscore"].startswith("tiny-bert at layer 2")
    m = summary_metrics(["the cat"], ["the cat sat"])
    assert m["bertscore_f1"] is None and m["bertscore"].startswith("skipped")


def test_bertscore_uses_layer_9_of_the_papers_model(tmp_path):
    """bert-base-multilingual-cased (recognised by its architecture: BERT, 119,547 pieces, 12 layers) is scored at
    bert-score's default layer for that name, 9, as evaluate's bertscore did for the authors."""
    from bert_score import score
    from transformers import AutoConfig

    assert bertscore_identity(BertConfig(vocab_size=119547, num_hidden_layers=12), "anywhere") == (None, 9)
    assert bertscore_identity(BertConfig(vocab_size=30522, num_hidden_layers=24), "/m/roberta-large") == (
        "roberta-large",
        17,
    )  # bert-score's own layer for that name
    assert bertscore_identity(BertConfig(num_hidden_layers=3), "/m/mine") == ("mine", 3)
    model = _tiny_bert(tmp_path / "mbert", WORDS + [f"w{i}" for i in range(119547 - len(WORDS))], 12)
    assert bertscore_identity(AutoConfig.from_pretrained(model), model) == (None, 9)
    preds, refs = ["the dog ran on the mat"], ["the cat sat on the mat"]
    got = bertscore(preds, refs, str(model))
    at = {layer: float(score(preds, refs, model_type=str(model), num_layers=layer)[2].mean()) for layer in (9, 12)}
    assert got["bertscore_f1"] == pytest.approx(at[9], abs=1e-6) and at[9] != pytest.approx(at[12], abs=1e-4)


@pytest.fixture(scope="module")
def tiny_checkpoints(demo_data, tmp_path_factory):
    """A random tiny LLaMA with the demo tokenizer: as an HF directory and as our parameter checkpoint."""
    from mellama_jax.convert.api import ImportRequest, hf_to_jax

    root = tmp_path_factory.mktemp("tiny-eval")
    torch.manual_seed(0)
    LlamaForCausalLM(hf_tiny_config(2, vocab_size=512)).eval().save_pretrained(root / "hf")
    shutil.copyfile(demo_data / "tok" / "tokenizer.model", root / "hf" / "tokenizer.model")
    return root / "hf", hf_to_jax(ImportRequest(root / "hf", root / "jax"), progress=False)


def rows_text(out_dir):
    return (out_dir / "predictions.jsonl").read_text()


@pytest.mark.parametrize(
    "task,data,keys",
    [
        ("mednli", "mli_test_v1.jsonl", {"accuracy", "macro_f1", "missing"}),
        ("bionli", "bionli_test.csv", {"accuracy", "macro_f1", "missing"}),
        ("ddi", "ddi_test.tsv", {"accuracy", "macro_f1", "missing"}),
        ("mtsample", "mtsamples.csv", {"accuracy", "macro_f1", "missing"}),
        ("hoc", "hoc_test.tsv", {"macro_f1", "exact_set_accuracy", "missing"}),
        ("emrqa", "emrqa.json", {"exact_match", "f1", "squad_exact_match", "squad_f1"}),
        ("i2b2", "i2b2", {"entity_f1", "entity_precision", "entity_recall"}),
        ("pubmedsum", "pubmed_test.jsonl", {"rouge1", "rouge2", "rougeL", "bertscore_f1"}),
        ("mimic-cxr", "cxr", {"rouge1", "rouge2", "rougeL", "bertscore_f1"}),
    ],
)
def test_every_task_end_to_end(task, data, keys, tiny_checkpoints, templates, files, tmp_path):
    _, params = tiny_checkpoints
    summary = evaluate(EvalRequest(task, files / data, params, tmp_path / "out", templates, max_new_tokens=4))
    assert keys <= set(summary) and summary["examples"] >= 1 and summary["examples_per_s"] > 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == summary["examples"] and all("output" in r and "prediction" in r for r in rows)
    assert (tmp_path / "out" / "summary.md").read_text().startswith("| task | backend |")
    again = rescore(RescoreRequest(task, tmp_path / "out" / "predictions.jsonl", tmp_path / "again"))  # no model
    assert again == {
        **{k: summary[k] for k in again if k not in ("backend", "predictions")},
        "backend": "rescored",
        "predictions": str(tmp_path / "out" / "predictions.jsonl"),
    }
    assert (tmp_path / "again" / "predictions.jsonl").read_text() == rows_text(tmp_path / "out")


def test_few_shot_and_sharded_decoding(tiny_checkpoints, templates, files, tmp_path):
    _, params = tiny_checkpoints
    t = load_templates(templates)
    prefix = few_shot_prefix("mednli", files / "mli_test_v1.jsonl", 2, t, seed=1)
    assert prefix.count("NLI\nINPUT: [PRE] ") == 2 and prefix == few_shot_prefix(
        "mednli", files / "mli_test_v1.jsonl", 2, t, seed=1
    )
    shown = [label for label in ("entailment", "neutral", "contradiction") if f"OUTPUT:\n{label}\n\n" in prefix]
    assert len(shown) == 2  # each demonstration ends with its gold answer
    with pytest.raises(ValueError, match="fewer than the 5"):
        few_shot_prefix("mednli", files / "mli_test_v1.jsonl", 5, t)
    plain = evaluate(
        EvalRequest(
            "hoc",
            files / "hoc_test.tsv",
            params,
            tmp_path / "one",
            templates,
            max_new_tokens=6,
            fewshot=1,
            fewshot_data=files / "hoc_test.tsv",
            dtype="float32",
        )
    )
    sharded = evaluate(
        EvalRequest(
            "hoc",
            files / "hoc_test.tsv",
            params,
            tmp_path / "mesh",
            templates,
            max_new_tokens=6,
            fewshot=1,
            fewshot_data=files / "hoc_test.tsv",
            mesh="data=2,fsdp=2,tensor=2",
            dtype="float32",
        )
    )
    outputs = {
        d: [json.loads(l)["output"] for l in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]
        for d in ("one", "mesh")
    }
    assert outputs["one"] == outputs["mesh"] and plain["macro_f1"] == sharded["macro_f1"]


def test_decoding_is_sharded_like_training(hf_pair, rng):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mellama_jax.config import MeshConfig
    from mellama_jax.generate import _decode, _hashable, decoder, generate, left_pad, shard_for_decoding
    from mellama_jax.sharding import batch_sharding, make_mesh

    _, ours, cfg = hf_pair
    prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in (6, 2, 10)]  # 3 rows: padded to 4 shards
    layout = MeshConfig(ici={"data": 2, "fsdp": 2, "tensor": 2})
    mesh = make_mesh(layout)
    sharded = shard_for_decoding(ours, mesh, layout.rules)
    np.testing.assert_array_equal(
        generate(sharded, prompts, 12, mesh=mesh, rules=layout.rules), generate(ours, prompts, 12)
    )
    q = nnx.state(sharded)["layers"]["attn"]["wq"]["kernel"]
    assert q.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    parts = decoder(sharded)  # each layer's slice keeps its layout
    assert parts.layers[1]["attn"]["wq"]["kernel"].get_value().sharding.spec == jax.sharding.PartitionSpec(
        "fsdp", "tensor"
    )
    ids, mask = left_pad(prompts + [prompts[0]], 0, 64)
    sh = batch_sharding(mesh, layout.rules)
    with jax.set_mesh(mesh):
        compiled = _decode.lower(
            *parts,
            jax.device_put(jnp.asarray(ids), sh),
            jax.device_put(jnp.asarray(mask), sh),
            12,
            jnp.int32(-1),
            jax.random.key(0),
            0.0,
            1.0,
            _hashable(layout.rules),
        ).compile()
    assert compiled.output_shardings.spec == jax.sharding.PartitionSpec(("data", "fsdp"))


def test_pubmed_titles_from_real_abstracts(tiny_checkpoints, tmp_path):
    path = shared_data("pubmed-abstracts", "abstracts.jsonl")
    hf_dir, params = tiny_checkpoints
    prompts = SHARED_DATA / "me-llama-prompts" / "prompt_templates.json"
    res = {
        b: evaluate(
            EvalRequest(
                "pubmed-title",
                path,
                m,
                tmp_path / b,
                prompts,
                b,
                limit=4,
                batch_size=4,
                max_new_tokens=8,
                dtype="float32",
            )
        )
        for b, m in (("jax", params), ("hf", hf_dir))
    }
    assert res["jax"]["rouge1"] == res["hf"]["rouge1"] and 0.0 <= res["jax"]["rouge1"] <= 1.0
    first = json.loads((tmp_path / "jax" / "predictions.jsonl").read_text().splitlines()[0])
    assert first["gold"] == json.loads(path.read_text().splitlines()[0])["title"]


def test_i2b2_concepts_in_any_order_give_the_same_gold(templates, files, tmp_path):
    """A .con file lists concepts in no promised order: reversed, the gold must not change (against the CoNLL
    file of the same sentences)."""
    t = load_templates(templates)
    shutil.copytree(files / "i2b2", tmp_path / "i2b2")
    con = tmp_path / "i2b2" / "concept" / "r1.con"
    con.write_text("\n".join(reversed(con.read_text().splitlines())) + "\n")
    _, reordered, _ = load_task("i2b2", tmp_path / "i2b2", t)
    _, from_conll, _ = load_task("i2b2", files / "i2b2.conll", t)
    assert [e.gold for e in reordered] == [e.gold for e in from_conll]

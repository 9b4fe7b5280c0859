"""Hugging Face models and data as users have them: a ``save_pretrained`` folder and a peft adapter
(:mod:`.models`), a data file (:mod:`.tables`) in one of five formats turned into token ids with the
positions the loss is on (:mod:`.formats`), and the matching per-example losses (:mod:`.lm`).

Importing this package loads neither transformers, peft nor pandas; its functions do, when called.

    loaded = load_model("my-model", adapter="my-adapter")
    rows = encode(read_table("train.jsonl"), loaded.tokenizer, loaded.kind)
    loader = DataLoader(rows.examples, batch_size=8, collate_fn=collator(loaded.tokenizer))
    engine = InfluenceEngine(loaded.model, CausalLMTask(), blocks=default_blocks(loaded.model))
"""

from hyperinf.hf.formats import FORMATS, Encoded, collator, encode, encode_choices
from hyperinf.hf.lm import CausalLMTask, ClassificationTask, choice_log_likelihoods, completion_loss
from hyperinf.hf.models import LoadedModel, default_blocks, load_model, parse_blocks
from hyperinf.hf.tables import read_table

__all__ = [
    "FORMATS",
    "CausalLMTask",
    "ClassificationTask",
    "Encoded",
    "LoadedModel",
    "choice_log_likelihoods",
    "collator",
    "completion_loss",
    "default_blocks",
    "encode",
    "encode_choices",
    "load_model",
    "parse_blocks",
    "read_table",
]

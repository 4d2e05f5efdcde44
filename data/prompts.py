"""Prompts through `datasets`, encoded once by the teacher's text encoders and cached to disk (PixArt; the model
families' pipelines: `predictors.families`).

Trainers of text-conditioned teachers never hold the text encoder (T5-XXL is 4.7B parameters): the
first `prepare_data` encodes every prompt and the empty prompt (classifier-free guidance's null
condition) into one safetensors file named by a hash of what produced it; later runs, and every
DDP rank, read that file. Prompts are lower-cased and stripped, as `PixArtAlphaPipeline` does with
`clean_caption=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from l2c.models import resolve_model_path
from l2c.sampling import TextCondition
from predictors.families import encode_with_pipeline, pipeline_family

LOCAL_BUILDERS = {".txt": "text", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_prompts(dataset: str, column: str, split: str, num_prompts: int | None) -> list[str]:
    """A local file (.txt: one prompt per line, column `text`; .csv/.json/.jsonl/.parquet) or a hub data set."""
    from datasets import load_dataset

    suffix = Path(dataset).suffix
    if Path(dataset).is_file() and suffix in LOCAL_BUILDERS:
        rows = load_dataset(LOCAL_BUILDERS[suffix], data_files=dataset, split="train")
    else:
        rows = load_dataset(dataset, split=split)
    if column not in rows.column_names:
        raise ValueError(f"prompts {dataset!r}: no column {column!r}; the data set has columns {rows.column_names}")
    prompts = [str(p).lower().strip() for p in rows[column] if p is not None and str(p).strip()]
    if num_prompts is not None:
        prompts = prompts[:num_prompts]
    if not prompts:
        raise ValueError(f"prompts {dataset!r}: column {column!r} holds no non-empty prompt")
    return prompts


@torch.no_grad()
def encode_prompts(
    prompts: list[str], encoder: str, max_length: int, batch_size: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Text-encoder outputs and masks of `prompts` and of the empty prompt, padded to `max_length` tokens (and the
    pooled embeddings where the family has them): a model family's pipeline directory (Flux, SD3, Wan, Qwen-Image)
    encodes with its pipeline's own `encode_prompt`, PixArt with its T5."""
    from transformers import AutoTokenizer, T5EncoderModel

    path = resolve_model_path(encoder)
    if pipeline_family(path) is not None:
        return encode_with_pipeline(path, prompts, max_length, batch_size, dtype)
    for sub in ("tokenizer", "text_encoder"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{path}: no {sub}/ directory; the prompt cache needs the teacher's text encoder")
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    model = T5EncoderModel.from_pretrained(path / "text_encoder").eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").to(
            device
        )
        embeds = model(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        return embeds.to("cpu", dtype), tokens.attention_mask.cpu()

    embeds, masks = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="encoding prompts", unit="batch"):
        e, m = encode(prompts[start : start + batch_size])
        embeds.append(e)
        masks.append(m)
    null_embeds, null_mask = encode([""])
    return {"embeds": torch.cat(embeds), "mask": torch.cat(masks), "null_embeds": null_embeds, "null_mask": null_mask}


class PromptConditions(Dataset):
    """Item i is (prompt i mod N, seed base + i): every prompt equally often, noise fixed by index."""

    def __init__(self, tensors: dict[str, torch.Tensor], size: int, base_seed: int = 0) -> None:
        self.tensors, self.size, self.base_seed = tensors, size, base_seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index % len(self.tensors["embeds"]), self.base_seed + index

    def collate(self, items: list[tuple[int, int]]) -> tuple[TextCondition, torch.Tensor]:
        rows = torch.tensor([i for i, _ in items])
        t = self.tensors
        pooled = (t["pooled"][rows], t["null_pooled"]) if "pooled" in t else (None, None)
        condition = TextCondition(t["embeds"][rows], t["mask"][rows], t["null_embeds"], t["null_mask"], rows, *pooled)
        return condition, torch.tensor([s for _, s in items])


class PromptDataModule(L.LightningDataModule):
    """Batches of (`TextCondition`, seeds) from cached text embeddings; each DDP rank gets its own slice."""

    def __init__(
        self,
        dataset: str,
        text_encoder: str,
        column: str = "prompt",
        split: str = "train",
        num_prompts: int | None = None,
        max_length: int = 120,
        cache_dir: str = "cache/prompts",
        embeds_dtype: Literal["float32", "float16", "bfloat16"] = "float16",
        encode_batch_size: int = 16,
        samples_per_epoch: int = 2048,
        batch_size: int = 8,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        """
        Args:
            dataset: A hub data set, or a local .txt (one prompt a line), .csv, .json, .jsonl or .parquet file.
            text_encoder: The directory or hub id holding the teacher's `tokenizer/` and `text_encoder/`.
            column: The data set's prompt column (`text` for a .txt file).
            split: The hub data set's split.
            num_prompts: Only the first N prompts (none: all).
            max_length: Tokens per prompt, padded or truncated (PixArt-α: 120).
            cache_dir: Where the encoded prompts are cached, one file named by a hash of what produced it.
            embeds_dtype: The cached embeddings' dtype.
            encode_batch_size: Prompts per text-encoder call while caching.
            samples_per_epoch: (prompt, noise seed) pairs per epoch: item i is prompt i mod N with seed `seed` + i.
            batch_size: Prompts per batch and process.
            seed: The first noise seed.
            shuffle: Shuffle the pairs every epoch; false: index order (each DDP rank its slice).
        """
        super().__init__()
        if embeds_dtype not in DTYPES:  # also for a module built in Python (LightningCLI checks the `Literal`)
            raise ValueError(f"prompt data: field 'embeds_dtype' is {embeds_dtype!r}, expected one of {list(DTYPES)}")
        for name, value in (("max_length", max_length), ("samples_per_epoch", samples_per_epoch)):
            if value < 1:
                raise ValueError(f"prompt data: field '{name}' must be ≥ 1, got {value}")
        self.save_hyperparameters()

    @property
    def cache_file(self) -> Path:
        """Named by everything that determines its content, so a changed setting never reads a stale cache."""
        hp = self.hparams
        key = [hp.dataset, hp.column, hp.split, hp.num_prompts, hp.text_encoder, hp.max_length, hp.embeds_dtype]
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        return Path(hp.cache_dir) / f"prompts-{digest}.safetensors"

    def prepare_data(self) -> None:
        path = self.cache_file
        if path.is_file():
            return
        hp = self.hparams
        prompts = load_prompts(hp.dataset, hp.column, hp.split, hp.num_prompts)
        tensors = encode_prompts(prompts, hp.text_encoder, hp.max_length, hp.encode_batch_size, DTYPES[hp.embeds_dtype])
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, partial, metadata={"source": hp.dataset})
        os.replace(partial, path)  # atomic: a crash never leaves a cache that loads
        print(f"cached {len(prompts)} prompt embeddings to {path}")

    def setup(self, stage: str | None = None) -> None:
        tensors = load_file(self.cache_file)
        self.train_set = PromptConditions(tensors, self.hparams.samples_per_epoch, self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        hp, trainer = self.hparams, getattr(self, "trainer", None)
        loader = dict(batch_size=hp.batch_size, drop_last=True, collate_fn=self.train_set.collate)
        if not hp.shuffle and trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(
                self.train_set, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
            return DataLoader(self.train_set, sampler=sampler, **loader)
        return DataLoader(self.train_set, shuffle=hp.shuffle, **loader)

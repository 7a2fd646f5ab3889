"""Augmentation: EDA word edits (Wei & Zou 2019) and model paraphrases, each added as a new record.

EDA edits `rate` of a document's words with random swaps, deletions, synonym insertions and synonym
replacements from a small bundled table (enough for common English; pass a bigger corpus through a
paraphrase model for more). A variant is a pure function of (seed, copy, text), so it is the same in
any worker process and on any rerun. Augmented records come after deduplication: they are meant to
be near-duplicates.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from jaxllm.prep.config import AugmentConfig

# Groups of interchangeable words; every word of a group is a synonym of the others.
_SYNONYM_GROUPS = """
big large huge great|small little tiny minor|fast quick rapid swift|slow sluggish unhurried
good fine decent solid|bad poor awful weak|begin start commence|end finish conclude complete
make create build produce|use employ utilize apply|show display present reveal|help aid assist support
get obtain acquire gain|give provide offer supply|find discover locate detect|keep retain hold preserve
change alter modify adjust|choose pick select|need require demand|try attempt endeavor
important significant crucial key|easy simple straightforward|hard difficult tough challenging
often frequently commonly|rarely seldom infrequently|many numerous several|also additionally furthermore
quickly rapidly swiftly|mostly largely mainly chiefly|clear obvious evident plain|exact precise accurate
whole entire complete full|part portion piece section|idea notion concept|method way approach technique
result outcome consequence|problem issue difficulty|answer reply response|ask inquire query
say state declare mention|think believe consider|look glance view|see notice observe|speak talk converse
house home dwelling|road street path route|car automobile vehicle|child kid youngster|man gentleman fellow
happy glad cheerful joyful|sad unhappy sorrowful gloomy|angry mad furious irate|calm quiet peaceful serene
smart clever bright intelligent|strange odd peculiar unusual|old aged ancient elderly|new fresh novel recent
rich wealthy affluent|strong powerful sturdy|beautiful pretty lovely attractive|buy purchase acquire
"""
SYNONYMS: dict[str, tuple[str, ...]] = {}
for _group in _SYNONYM_GROUPS.replace("\n", "|").split("|"):
    _words = _group.split()
    for _w in _words:
        SYNONYMS.setdefault(_w, tuple(x for x in _words if x != _w))


def variants(text: str, cfg: AugmentConfig) -> list[str]:
    """`cfg.copies` EDA variants of `text` (those equal to it are left out)."""
    if not (cfg.enabled and cfg.ops and cfg.copies and cfg.rate):
        return []
    out = []
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    for copy in range(cfg.copies):
        variant = eda(text, cfg.ops, cfg.rate, random.Random(f"{cfg.seed}:{copy}:{digest}"))
        if variant != text:
            out.append(variant)
    return out


def eda(text: str, ops: Sequence[str], rate: float, rng: random.Random) -> str:
    """`text` with round(rate * words) (at least one) edits, each an op drawn from `ops`; line breaks stay."""
    words = [[line, w] for line, text_line in enumerate(text.split("\n")) for w in text_line.split()]
    num_lines = text.count("\n") + 1
    for _ in range(max(1, round(rate * len(words)))):
        if not words:
            break
        op = rng.choice(list(ops))
        if op == "swap" and len(words) >= 2:
            i, j = rng.sample(range(len(words)), 2)
            words[i][1], words[j][1] = words[j][1], words[i][1]
        elif op == "delete" and len(words) >= 2:
            del words[rng.randrange(len(words))]
        elif op in ("insert", "synonym"):
            choices = [i for i, (_, w) in enumerate(words) if _bare(w) in SYNONYMS]
            if not choices:
                continue
            i = rng.choice(choices)
            synonym = _like(words[i][1], rng.choice(SYNONYMS[_bare(words[i][1])]))
            if op == "synonym":
                words[i][1] = synonym
            else:
                at = rng.randrange(len(words) + 1)
                line = words[min(at, len(words) - 1)][0]
                words.insert(at, [line, _bare_case(synonym)])
    lines: list[list[str]] = [[] for _ in range(num_lines)]
    for line, w in words:
        lines[line].append(w)
    return "\n".join(" ".join(ws) for ws in lines)


def _bare(word: str) -> str:
    return _bare_case(word).lower()


def _bare_case(word: str) -> str:
    return word.strip(".,;:!?\"'()[]")


def _like(original: str, synonym: str) -> str:
    """`synonym` in the place of `original`: its capitalization and surrounding punctuation kept."""
    core = _bare_case(original)
    start = original.find(core)
    if core[:1].isupper():
        synonym = synonym[:1].upper() + synonym[1:]
    return original[:start] + synonym + original[start + len(core) :]


def wants_paraphrase(text: str, cfg: AugmentConfig) -> bool:
    """Whether `text` is in the seeded `paraphrase_fraction` of documents that get a paraphrase."""
    if not (cfg.enabled and cfg.paraphrase_model):
        return False
    digest = hashlib.blake2b(f"{cfg.seed}:{text}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < cfg.paraphrase_fraction


class Paraphraser:
    """Paraphrases with a jaxllm workdir or Hugging Face folder through
    `jaxllm.models.generation.generate_text`."""

    def __init__(self, cfg: AugmentConfig, batch_size: int = 8):
        from jaxllm import load  # pylint: disable=g-import-not-at-top  (imports jax)
        from jaxllm.models import generation as generate

        self._cfg, self._batch_size, self._generate = cfg, batch_size, generate
        self._model, self._params, self._tokenizer, self._add_bos = load.load_model(cfg.paraphrase_model)
        self._gen = generate.GenerateConfig(
            max_new_tokens=cfg.paraphrase_max_new_tokens, temperature=cfg.paraphrase_temperature, seed=cfg.seed
        )

    def __call__(self, texts: list[str]) -> list[str]:
        prompts = [self._cfg.paraphrase_prompt.format(text=t) for t in texts]
        outs = self._generate.generate_text(
            self._model,
            self._params,
            self._tokenizer,
            prompts,
            self._gen,
            add_bos=self._add_bos,
            batch_size=self._batch_size,
        )
        return [o.strip() for o in outs]

"""Data preparation: raw text / JSONL / Parquet / TFDS -> cleaned, filtered, deduplicated, tokenized
ArrayRecord shards that training reads with `data.source=array_record`.

    jaxllm prep --input='corpus/*.jsonl' --output=prepared --config=configs/prep_default.py
    jaxllm train --config=configs/tiny.py --config.data.source=array_record \
        --config.data.paths=prepared/*.array_record --config.data.tokenizer=prepared/tokenizer.model

Every stage reports what it read, kept and removed (by reason) in prepared/stats.json and report.md.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_workers = 0  # processes for clean / quality / tokenize; 0 = all cores, 1 = in this process
    c.progress = True  # tqdm progress bars on stderr
    c.input = dict(  # what is read and how bad input is handled (counted, never a crash)
        text_split="file",  # plain text: "file" (one document per file) or "paragraph" (blank-line blocks)
        text_field="text",  # JSON / Parquet / TFDS field holding the document
        tfds_data_dir="",  # where `tfds:name:split` inputs were prepared ("" = TFDS default); never downloads
        decode_errors="replace",  # non-UTF-8 bytes: replace (U+FFFD) | ignore (drop the bytes) | skip (drop the doc)
        max_doc_bytes=8_000_000,  # a bigger document (or JSON line) is cut (text) or dropped (JSON): memory stays flat
        too_long="truncate",  # plain text over max_doc_bytes: truncate (at the last line end before the cap) | skip
    )
    c.clean = dict(  # per-document text normalization before any filter
        enabled=True,  # Unicode normalization, control characters, whitespace, length limits
        unicode="NFC",  # NFC | NFKC | none
        strip_control=True,  # drop control and format characters (zero-width, BOM), keep newline and tab
        whitespace="lines",  # none | lines (CRLF->LF, strip line ends, <=1 blank line in a row) | all (+ spaces)
        min_chars=1,  # shorter cleaned documents are dropped
        max_chars=0,  # longer cleaned documents are dropped; 0 = no limit
    )
    c.quality = dict(  # Gopher (Rae et al. 2021) document filters; 0 switches a rule off
        enabled=True,  # False keeps every document the cleaner kept
        min_words=50,  # whitespace-separated words per document
        max_words=100_000,  # longer documents are dropped
        min_mean_word_length=3.0,  # characters per word
        max_mean_word_length=10.0,  # above: mostly URLs, hashes, minified code
        max_symbol_word_ratio=0.1,  # ('#' + '...' + '…') per word
        max_ellipsis_line_fraction=0.3,  # lines ending with '...' or '…'
        max_bullet_line_fraction=0.9,  # lines starting with a bullet (•, -, *, ‣, ...)
        max_non_alpha_word_fraction=0.2,  # words without a single letter
        max_duplicate_line_fraction=0.3,  # lines that repeat an earlier line of the document
        top_ngram_max_fractions=(0.20, 0.18, 0.16),  # for n = 2, 3, 4: chars covered by the most common word n-gram
        # C4 (Raffel et al. 2020) rules, off by default:
        c4_lorem_ipsum=False,  # drop documents containing "lorem ipsum"
        c4_javascript=False,  # drop lines mentioning "javascript"
        c4_curly_bracket=False,  # drop documents containing '{' (mostly code)
        c4_terminal_punctuation=False,  # keep only lines ending in . ! ? or a quote
        c4_min_words_per_line=0,  # drop lines with fewer words; 0 = off
        # Language identification (langid.py, pip install 'jaxllm[langid]'), off while languages is empty:
        languages=(),  # ISO 639-1 codes to keep, e.g. ("en",) or ("en", "de")
        min_language_score=0.65,  # a document is kept when its most likely language is listed with this probability
        language_sample_chars=2000,  # the first characters of a document are classified (bounds the cost)
    )
    # Near duplicates: word 5-gram Jaccard s >= 0.7 (3 of 120 words replaced gives s ~ 0.77). A pair
    # becomes a candidate with P = 1 - (1 - s^r)^b (b bands of r rows): at b=20, r=6 that is 0.92 at
    # s=0.7, 0.99 at 0.77, 0.27 at 0.5, 0.03 at 0.33. A candidate counts as a duplicate only if its
    # signatures agree on >= threshold of the 120 rows (binomial, sd ~0.04), which cuts the S-curve's
    # tail: together 0.96 at s=0.77, 0.5 at 0.7, 0.015 at 0.6, < 0.001 at 0.5 and below. FineWeb's
    # 14 x 8 without that check gives 0.84 at 0.77 but 0.21 at 0.6 and 0.05 at 0.5; 16 x 8 with
    # threshold 0.8 (the earlier defaults) gave 0.2 at 0.77: most such copies stayed.
    c.dedup = dict(  # keeps the first occurrence; dropped copies are counted by kind
        exact=True,  # drop documents whose normalized text (casefolded, whitespace collapsed) was seen
        near=True,  # MinHash + LSH near-duplicate removal; the first occurrence is kept
        num_perm=120,  # MinHash permutations (signature length)
        bands=20,  # LSH bands; num_perm must be a multiple (rows per band = num_perm // bands)
        shingle_size=5,  # words per shingle
        threshold=0.7,  # a candidate pair is a duplicate when this fraction of its signature rows agree
        seed=0,  # of the MinHash hash functions
    )
    c.augment = dict(  # adds records after dedup; originals always stay
        enabled=False,  # True: add EDA variants (ops) and/or model paraphrases
        ops=("swap", "delete", "insert", "synonym"),  # EDA operations (Wei & Zou 2019), one picked per edit
        rate=0.1,  # fraction of a document's words edited
        copies=1,  # augmented variants added per kept document
        seed=0,  # of the EDA edits and of the paraphrase sampling and selection
        paraphrase_model="",  # jaxllm workdir or Hugging Face folder: adds a generated paraphrase per document
        paraphrase_prompt="Paraphrase the following text.\nText: {text}\nParaphrase:",  # {text} = the document
        paraphrase_fraction=1.0,  # of kept documents that get a paraphrase (chosen by a seeded hash)
        paraphrase_max_new_tokens=128,  # length cap of a paraphrase
        paraphrase_temperature=0.7,  # sampling temperature; 0 = greedy
    )
    c.curriculum = dict(  # difficulty score and bucket written with every record
        enabled=True,  # False: score 0, bucket 0, input order
        length_weight=1.0,  # score = weighted sum of percentile ranks (0 = easiest): length in tokens (or chars)
        rarity_weight=0.0,  # mean -log unigram frequency of the document's tokens (needs tokenize.enabled)
        field_weight=0.0,  # a numeric field of the input rows (curriculum.field)
        field="",  # JSON / Parquet / TFDS field read for field_weight; rows without it score 0
        model_weight=0.0,  # mean next-token loss under a reference model (curriculum.model)
        model="",  # jaxllm workdir or Hugging Face folder scoring documents for model_weight
        model_max_tokens=256,  # tokens of each document the reference model reads
        model_batch_size=8,  # documents per reference-model forward pass
        num_buckets=4,  # score quantile buckets written with each record (0 = easiest)
        order="easy_to_hard",  # easy_to_hard (by bucket, then score) | input (input order)
    )
    c.tokenize = dict(  # also writes DIR/tokenizer.model for data.tokenizer
        enabled=True,  # False: records without tokens, lengths in characters
        tokenizer="",  # SentencePiece .model or Hugging Face folder; "" trains SentencePiece on the cleaned corpus
        vocab_size=0,  # of a trained tokenizer; 0 = 8000, or the most a small corpus supports (the report says)
        write_tokens=True,  # store the token ids in each record ("tokens")
    )
    c.output = dict(  # DIR/data-XXXXX-of-YYYYY.array_record, stats.json, report.md
        records_per_shard=100_000,  # records per ArrayRecord shard
        overwrite=False,  # replace an earlier prep output in the folder; False = refuse
    )
    return c

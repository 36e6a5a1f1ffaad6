"""Tiny, download-free building blocks for the TRL trainer tests (tests/test_trl_trainers.py): a word-level
tokenizer built in memory, a 2-layer Llama of that vocabulary with a fixed seed, small in-memory datasets."""

import torch

WORDS = [f"w{i}" for i in range(92)]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
VOCAB = 96  # len(SPECIALS) + len(WORDS): the model's vocabulary is the tokenizer's


def tokenizer():
    """A PreTrainedTokenizerFast over a word-level vocabulary (whitespace split), with pad / eos / bos / unk, left
    padding (what the generating trainers ask for). Nothing is downloaded or trained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", padding_side="left")
    return fast


def model(seed: int = 0, hidden: int = 32, layers: int = 2, init_std: float = 0.2):
    """A float32 LlamaForCausalLM with random weights from ``seed`` (untied head: the head's gradient is its own).
    init_std 0.2 (transformers' default is 0.02) gives logits of spread ~1: next-token distributions far from
    uniform, so the log-sum-exp, entropy and divergences are not all near their uniform values."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, initializer_range=init_std, pad_token_id=0,
                                   eos_token_id=1, bos_token_id=2,
                                   tie_word_embeddings=False)
    m = transformers.LlamaForCausalLM(cfg).float()
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = 1
    m.generation_config.bos_token_id = 2
    return m


def _words(g: torch.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))


def texts(n: int, lo: int, hi: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [_words(g, int(torch.randint(lo, hi + 1, (1,), generator=g))) for _ in range(n)]


def greedy_completions(model, tok, prompts: list[str], new_tokens: int) -> list[str]:
    """The model's own greedy continuation of each prompt, as text with a leading space (special tokens dropped):
    training on them, the model's argmax is the label at most positions, so a token-accuracy metric is far from 0."""
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)
        out.append(" " + tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
    return out

"""Write a tiny, random-weight llama-architecture GGUF model that llama.cpp loads and runs on a CPU.

Its answers are random English words, deterministic under greedy sampling for a given seed: all the
demo and the tests need is a real engine that loads, streams tokens and reports usage/timings, and
different seeds are different "models" (different answers). Nothing is downloaded.

Needs the `demo` extra (`pip install 'llm-router[demo]'`: gguf, numpy).

    python -m router.demo.tiny_gguf /tmp/tiny-a.gguf --seed 1
    from router.demo.tiny_gguf import make_tiny_gguf; make_tiny_gguf("/tmp/tiny-a.gguf", seed=1)

Defaults: 2 layers, width 64, a 763-token vocabulary (3 specials, 256 byte-fallback tokens so any
prompt tokenizes, ~500 English words), a chat template, a context length of 8,192 tokens (the
demo's --ctx-size; llama.cpp warns when serving more than a model's n_ctx_train), 0.7 MB,
written in ~0.2 s. `--embd 512
--layers 4` gives a ~17M-parameter, 68 MB model for benchmarks. The models rarely emit EOS: serve
them with `--n-predict 64` or send `max_tokens`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# SentencePiece-style vocabulary: 3 specials, 256 byte-fallback tokens (so any prompt tokenizes), and a
# few hundred English words. The output layer gives the byte tokens zero weight, so answers come out as
# readable (random) words rather than raw bytes, which matters when a person watches the demo.
_WORDS = """the a is of and to in it that was for on are with as I his they be at one have this from or had
by word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know water than call first who
may down side been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form sentence great think
say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant
fill east paint language among model router token GPU""".split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tiny_gguf(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    layers: int = 2,
    embd: int = 64,
    ff: int = 0,
    heads: int = 4,
    ctx: int = 8192,
    f16: bool = False,
    name: str = "tiny-llama",
) -> str:
    """Write the model to `path` (atomically: a partial file never has the final name); return a summary."""
    import numpy as np  # the demo extra; imported here so `--help` works without it
    from gguf import GGUFWriter, TokenType

    if embd % heads:
        raise ValueError(f"embd ({embd}) must be a multiple of heads ({heads})")
    ff = ff or 4 * embd
    rng = np.random.default_rng(seed)
    dtype = np.float16 if f16 else np.float32

    words = ["\u2581" + w for w in dict.fromkeys(_WORDS)] + [".", ",", "!", "?"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + words
    types = ([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
             + [TokenType.NORMAL] * len(words))
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))]
    n_vocab = len(tokens)

    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    w = GGUFWriter(str(tmp), "llama")
    try:
        w.add_name(name)
        w.add_context_length(ctx)
        w.add_embedding_length(embd)
        w.add_block_count(layers)
        w.add_feed_forward_length(ff)
        w.add_head_count(heads)
        w.add_head_count_kv(heads)
        w.add_rope_dimension_count(embd // heads)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(1 if f16 else 0)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_chat_template(CHAT_TEMPLATE)

        def t(*shape: int, scale: float = 0.02) -> np.ndarray:
            return (rng.standard_normal(shape) * scale).astype(dtype)

        w.add_tensor("token_embd.weight", t(n_vocab, embd))
        w.add_tensor("output_norm.weight", np.ones(embd, dtype=np.float32))
        out = t(n_vocab, embd, scale=0.5)  # words (and </s>, so answers can end) get large logits
        out[0:1] = 0
        out[3:259] = 0  # byte tokens: logit 0, far below the best word
        w.add_tensor("output.weight", out)
        for i in range(layers):
            p = f"blk.{i}."
            w.add_tensor(p + "attn_norm.weight", np.ones(embd, dtype=np.float32))
            for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
                w.add_tensor(p + n + ".weight", t(embd, embd))
            w.add_tensor(p + "ffn_norm.weight", np.ones(embd, dtype=np.float32))
            w.add_tensor(p + "ffn_gate.weight", t(ff, embd))
            w.add_tensor(p + "ffn_up.weight", t(ff, embd))
            w.add_tensor(p + "ffn_down.weight", t(embd, ff))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    params = 2 * n_vocab * embd + layers * (4 * embd * embd + 3 * embd * ff)
    return (f"wrote {out_path}: llama, {layers} layers, embd {embd}, vocab {n_vocab}, "
            f"~{params / 1e6:.2f}M params, {'F16' if f16 else 'F32'}, seed {seed}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m router.demo.tiny_gguf",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the .gguf file to write")
    ap.add_argument("--seed", type=int, default=0, help="different seeds give different 'models'")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--embd", type=int, default=64, help="embedding width (64 -> ~0.2M params; 512 -> ~14M)")
    ap.add_argument("--ff", type=int, default=0, help="feed-forward width (default 4*embd)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=8192,
                    help="context length the model is trained for (llama.cpp's n_ctx_train)")
    ap.add_argument("--f16", action="store_true", help="store weights as F16 instead of F32")
    ap.add_argument("--name", default="tiny-llama", help="general.name in the GGUF metadata")
    a = ap.parse_args(argv)
    try:
        print(make_tiny_gguf(a.out, seed=a.seed, layers=a.layers, embd=a.embd, ff=a.ff, heads=a.heads,
                             ctx=a.ctx, f16=a.f16, name=a.name))
    except ImportError as exc:
        print(f"tiny_gguf: {exc}; install the demo extra: pip install 'llm-router[demo]'", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"tiny_gguf: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

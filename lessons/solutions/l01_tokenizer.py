"""Solutions to lesson 1's "Try it" (checked by lessons/exercises/l01_tokenizer.py)."""
import regex

import bpe


def decode(ids, merges):
    vocab = [bytes([b]) for b in range(256)]  # token id -> its bytes
    for a, b in merges:  # merge k makes token 256 + k
        vocab.append(vocab[a] + vocab[b])
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def encode(text, merges):
    rank = {pair: 256 + k for k, pair in enumerate(merges)}  # (a, b) -> the id it makes
    ids = []
    for chunk in regex.findall(bpe.SPLIT_PATTERN, text):
        chunk_ids = list(chunk.encode("utf-8"))
        while len(chunk_ids) >= 2:
            first = min(zip(chunk_ids, chunk_ids[1:]), key=lambda pair: rank.get(pair, float("inf")))
            if first not in rank:
                break  # no pair of this chunk was ever merged
            chunk_ids = bpe.merge_pair(chunk_ids, first, rank[first])
        ids += chunk_ids
    return ids


def decode_token_by_token(ids, merges):
    vocab = [bytes([b]) for b in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    return "".join(vocab[i].decode("utf-8", errors="replace") for i in ids)


def encode_left_to_right(text, merges):
    rank = {pair: 256 + k for k, pair in enumerate(merges)}
    ids = []
    for chunk in regex.findall(bpe.SPLIT_PATTERN, text):
        chunk_ids = list(chunk.encode("utf-8"))
        while True:  # merge the leftmost pair that is a merge, whatever its rank
            i = next((i for i, pair in enumerate(zip(chunk_ids, chunk_ids[1:])) if pair in rank), None)
            if i is None:
                break
            chunk_ids[i:i + 2] = [rank[chunk_ids[i], chunk_ids[i + 1]]]
        ids += chunk_ids
    return ids


WRONG = dict(  # a plausible mistake per exercise: each must fail its check
    decode=decode_token_by_token,  # decodes each token alone: splits characters of several bytes
    encode=encode_left_to_right,  # ignores the order in which the merges were learned
)

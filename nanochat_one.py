"""
nanochat-one: a ChatGPT-style model built end to end in one readable file.

    BPE tokenizer -> base pretraining -> mid-training -> SFT -> RL (GRPO) -> evaluation -> chat

Everything runs offline on a laptop CPU with the embedded TinyWorld data (a small, consistent
synthetic world: countries and capitals, animals, colours, arithmetic, stories, word problems),
and the same code scales to a GPU node with torchrun and real data.

One command per stage; each finds its input checkpoint by convention (base -> mid -> sft -> rl):

    python nanochat_one.py --stage tok             # train the BPE tokenizer (bpe.py)
    python nanochat_one.py --stage base            # pretrain; val bits-per-byte and samples
    python nanochat_one.py --stage mid             # conversations, multiple choice, tool use
    python nanochat_one.py --stage sft             # supervised fine-tuning on assistant turns
    python nanochat_one.py --stage rl              # simplified GRPO on word problems
    python nanochat_one.py --stage eval --source sft
    python nanochat_one.py --stage eval --source base --core-bundle eval_bundle   # CORE (DCLM tasks)
    python nanochat_one.py --stage chat -p "What is the capital of France?"
    python nanochat_one.py --stage report          # gather everything into report.md

Any training stage continues from its last checkpoint with --resume. The laptop pipeline is
`bash speedrun.sh` (tiny depth, CPU, minutes). On one node with 8 GPUs:

    torchrun --standalone --nproc_per_node=8 nanochat_one.py --stage base --data hf --depth 20 \
        --aspect-ratio 64 --head-dim 128 --max-seq-len 2048 --device-batch-size 32 --total-batch-size 524288

Artifacts (tokenizer, checkpoints, reports) go to $NANOCHAT_BASE_DIR, default ./runs next to
this file. The sections below are in dependency order: runtime, tokenizer glue, data, model,
optimizers, loaders, engine, evaluation, checkpoints, training, stages, CLI.
"""
import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bpe


class UserError(Exception):
    """A mistake the user can fix (missing checkpoint, bad flag value): printed as one line."""


# -----------------------------------------------------------------------------------------------
# Runtime: device, precision, distributed, logging, artifacts

def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DEVICE_TYPE = os.environ.get("NANOCHAT_DEVICE", autodetect_device_type())


def default_compute_dtype():
    # bf16 matmuls where the hardware does them natively (Ampere and newer), else fp32.
    # The weights always stay fp32 ("master weights"); only the matmuls run in COMPUTE_DTYPE.
    name = os.environ.get("NANOCHAT_DTYPE")
    if name:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}[name]
    if DEVICE_TYPE == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


COMPUTE_DTYPE = default_compute_dtype()


def autocast():
    """Context for forward passes: matmuls in COMPUTE_DTYPE, weights untouched."""
    if COMPUTE_DTYPE == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=DEVICE_TYPE, dtype=COMPUTE_DTYPE)


@dataclass
class Dist:
    """Where this process sits in a torchrun job (a plain `python` run is rank 0 of 1)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_ddp(self):
        return self.world_size > 1

    @property
    def is_master(self):
        return self.rank == 0


def init_distributed():
    """Read torchrun's environment variables and join the process group (NCCL on GPUs, gloo on CPU)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if DEVICE_TYPE == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(DEVICE_TYPE)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if DEVICE_TYPE == "cuda" else "gloo", device_id=device if DEVICE_TYPE == "cuda" else None)
    return Dist(rank, local_rank, world_size, device)


def print0(*args, **kwargs):
    """print, on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def base_dir():
    return Path(os.environ.get("NANOCHAT_BASE_DIR", Path(__file__).resolve().parent / "runs"))


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------------------------
# Tokenizer glue: special tokens, loading, bytes per token

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document and every conversation
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the calculator tool
    "<|output_start|>", "<|output_end|>",  # the tool's result, forced into the stream
]


def tokenizer_path():
    return base_dir() / "tokenizer" / "tokenizer.json"


def get_tokenizer():
    path = tokenizer_path()
    if not path.exists():
        raise UserError(f"no tokenizer at {path}: run `python nanochat_one.py --stage tok` first")
    return bpe.Tokenizer.load(path)


def tokenizer_id(tokenizer):
    """A short fingerprint of the tokenizer, stored in checkpoints to catch mismatches."""
    blob = json.dumps([tokenizer.pattern, tokenizer.merges, list(tokenizer.special_tokens)]).encode()
    return f"{zlib.crc32(blob):08x}-{tokenizer.vocab_size}"


def token_byte_lengths(tokenizer, device="cpu"):
    """Bytes of text behind each token id; 0 for special tokens, which bits-per-byte ignores."""
    lengths = [len(tokenizer.vocab[i]) for i in range(256 + len(tokenizer.merges))]
    lengths += [0] * len(tokenizer.special_tokens)
    return torch.tensor(lengths, dtype=torch.int64, device=device)


def render_conversation(tokenizer, conversation, max_tokens=None):
    """Turn a conversation into token ids and a loss mask (1 = the model learns to say this).

    conversation: {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}.
    Assistant content is a string, or a list of parts {"type": "text"|"python"|"python_output",
    "text": ...} for answers that call the calculator. For example
        user "1+1?" / assistant [text "Sure: ", python "1+1", python_output "2", text "2"]
    renders as (mask underneath)
        <|bos|> <|user_start|> 1+1? <|user_end|> <|assistant_start|> Sure: <|python_start|> 1+1
           0          0          0        0               0            1          1          1
        <|python_end|> <|output_start|> 2 <|output_end|> 2 <|assistant_end|>
              1               0         0       0        1        1
    The model learns the assistant's words, its tool calls and when to stop; never the user's
    words, nor the tool's output, which the engine forces in at inference time. Message text
    is encoded as ordinary text, so a user typing "<|assistant_start|>" cannot inject the token."""
    messages = list(conversation["messages"])
    if messages and messages[0]["role"] == "system":  # no system role: fold it into the first user turn
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        messages = [dict(role="user", content=messages[0]["content"] + "\n\n" + messages[1]["content"])] + messages[2:]
    special = tokenizer.special_tokens
    ids, mask = [special["<|bos|>"]], [0]

    def add(tokens, supervised):
        ids.extend(tokens)
        mask.extend([supervised] * len(tokens))

    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"message {i} has role {message['role']!r}; roles must alternate user, assistant, ... "
                             "starting with user (after an optional system message)")
        content = message["content"]
        if expected == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {i}: user content must be a string")
            add([special["<|user_start|>"]] + tokenizer.encode_ordinary(content) + [special["<|user_end|>"]], 0)
            continue
        add([special["<|assistant_start|>"]], 0)
        parts = [dict(type="text", text=content)] if isinstance(content, str) else content
        for part in parts:
            text = tokenizer.encode_ordinary(part["text"])
            if part["type"] == "text":
                add(text, 1)
            elif part["type"] == "python":
                add([special["<|python_start|>"]] + text + [special["<|python_end|>"]], 1)
            elif part["type"] == "python_output":
                add([special["<|output_start|>"]] + text + [special["<|output_end|>"]], 0)
            else:
                raise ValueError(f"message {i}: unknown content part type {part['type']!r}")
        add([special["<|assistant_end|>"]], 1)
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_for_completion(tokenizer, conversation):
    """The prompt for the model's next answer: the conversation without its last assistant
    message (if any), then <|assistant_start|>."""
    messages = list(conversation["messages"])
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = render_conversation(tokenizer, dict(messages=messages))
    return ids + [tokenizer.special_tokens["<|assistant_start|>"]]


# -----------------------------------------------------------------------------------------------
# Data: TinyWorld, the embedded default

# TinyWorld is one small, consistent world: every fact comes from the tables below, so the
# pretraining documents, fact questions, chats, multiple choice and word problems never
# contradict each other. The language is simple and regular, so a 4-layer model learns it in
# minutes, yet wide enough for a BPE to learn ~4000 merges from 1 MB. Every generator takes a
# random.Random: a fixed seed always gives the same data. The facts are real; the people invented.

def a_an(word):
    return ("an " if word[0] in "aeiou" and not word.startswith("uni") else "a ") + word


def cap(text):
    return text[0].upper() + text[1:]


def join_and(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def plural(noun):
    """Regular English plurals, enough for the nouns in these tables: box -> boxes, cherry -> cherries."""
    if noun.endswith(("s", "x", "ch", "sh", "o")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


# -----------------------------------------------------------------------------------------------
# Fact tables. All facts are real; only the people are invented.

COUNTRIES = [  # (country, capital, continent)
    ("France", "Paris", "Europe"), ("Germany", "Berlin", "Europe"), ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"), ("Portugal", "Lisbon", "Europe"), ("Greece", "Athens", "Europe"),
    ("Norway", "Oslo", "Europe"), ("Sweden", "Stockholm", "Europe"), ("Finland", "Helsinki", "Europe"),
    ("Denmark", "Copenhagen", "Europe"), ("Poland", "Warsaw", "Europe"), ("Austria", "Vienna", "Europe"),
    ("Hungary", "Budapest", "Europe"), ("Ireland", "Dublin", "Europe"), ("Belgium", "Brussels", "Europe"),
    ("Romania", "Bucharest", "Europe"), ("Ukraine", "Kyiv", "Europe"), ("Iceland", "Reykjavik", "Europe"),
    ("Croatia", "Zagreb", "Europe"), ("Serbia", "Belgrade", "Europe"), ("Bulgaria", "Sofia", "Europe"),
    ("Japan", "Tokyo", "Asia"), ("China", "Beijing", "Asia"), ("India", "New Delhi", "Asia"),
    ("South Korea", "Seoul", "Asia"), ("Thailand", "Bangkok", "Asia"), ("Vietnam", "Hanoi", "Asia"),
    ("Nepal", "Kathmandu", "Asia"), ("Mongolia", "Ulaanbaatar", "Asia"), ("Pakistan", "Islamabad", "Asia"),
    ("Iran", "Tehran", "Asia"), ("Iraq", "Baghdad", "Asia"), ("Saudi Arabia", "Riyadh", "Asia"),
    ("Malaysia", "Kuala Lumpur", "Asia"), ("Bangladesh", "Dhaka", "Asia"), ("Laos", "Vientiane", "Asia"),
    ("Cambodia", "Phnom Penh", "Asia"), ("Qatar", "Doha", "Asia"), ("Jordan", "Amman", "Asia"),
    ("Oman", "Muscat", "Asia"), ("Bhutan", "Thimphu", "Asia"),
    ("Egypt", "Cairo", "Africa"), ("Kenya", "Nairobi", "Africa"), ("Nigeria", "Abuja", "Africa"),
    ("Ghana", "Accra", "Africa"), ("Ethiopia", "Addis Ababa", "Africa"), ("Morocco", "Rabat", "Africa"),
    ("Senegal", "Dakar", "Africa"), ("Algeria", "Algiers", "Africa"), ("Uganda", "Kampala", "Africa"),
    ("Rwanda", "Kigali", "Africa"), ("Zambia", "Lusaka", "Africa"), ("Zimbabwe", "Harare", "Africa"),
    ("Mali", "Bamako", "Africa"), ("Angola", "Luanda", "Africa"), ("Namibia", "Windhoek", "Africa"),
    ("Botswana", "Gaborone", "Africa"), ("Madagascar", "Antananarivo", "Africa"),
    ("Canada", "Ottawa", "North America"), ("Mexico", "Mexico City", "North America"),
    ("Cuba", "Havana", "North America"), ("Jamaica", "Kingston", "North America"),
    ("Nicaragua", "Managua", "North America"), ("Honduras", "Tegucigalpa", "North America"),
    ("Brazil", "Brasilia", "South America"), ("Argentina", "Buenos Aires", "South America"),
    ("Chile", "Santiago", "South America"), ("Peru", "Lima", "South America"),
    ("Colombia", "Bogota", "South America"), ("Venezuela", "Caracas", "South America"),
    ("Ecuador", "Quito", "South America"), ("Uruguay", "Montevideo", "South America"),
    ("Guyana", "Georgetown", "South America"),
    ("Australia", "Canberra", "Oceania"), ("New Zealand", "Wellington", "Oceania"),
    ("Fiji", "Suva", "Oceania"), ("Papua New Guinea", "Port Moresby", "Oceania"), ("Samoa", "Apia", "Oceania"),
]
CONTINENTS = ["Europe", "Asia", "Africa", "North America", "South America", "Oceania"]

ANIMALS = [  # (name, plural, sound, legs, home, food, young); no two animals share a sound but lion/tiger
    ("dog", "dogs", "barks", 4, "in houses with people", "meat", "puppy"),
    ("cat", "cats", "meows", 4, "in houses with people", "fish and meat", "kitten"),
    ("cow", "cows", "moos", 4, "on farms", "grass", "calf"),
    ("horse", "horses", "neighs", 4, "on farms", "hay and grass", "foal"),
    ("sheep", "sheep", "baas", 4, "on farms", "grass", "lamb"),
    ("pig", "pigs", "oinks", 4, "on farms", "vegetables and grain", "piglet"),
    ("donkey", "donkeys", "brays", 4, "on farms", "hay", "foal"),
    ("duck", "ducks", "quacks", 2, "near ponds", "water plants and seeds", "duckling"),
    ("chicken", "chickens", "clucks", 2, "on farms", "seeds and grain", "chick"),
    ("goose", "geese", "honks", 2, "near lakes", "grass", "gosling"),
    ("owl", "owls", "hoots", 2, "in the forest", "mice", "owlet"),
    ("crow", "crows", "caws", 2, "in tall trees", "seeds and insects", "chick"),
    ("dove", "doves", "coos", 2, "in trees and towns", "seeds", "squab"),
    ("turkey", "turkeys", "gobbles", 2, "on farms", "seeds and insects", "poult"),
    ("lion", "lions", "roars", 4, "on the savanna", "meat", "cub"),
    ("tiger", "tigers", "roars", 4, "in the jungle", "meat", "cub"),
    ("bear", "bears", "growls", 4, "in the forest", "berries and fish", "cub"),
    ("wolf", "wolves", "howls", 4, "in the forest", "meat", "pup"),
    ("elephant", "elephants", "trumpets", 4, "on the savanna", "leaves and grass", "calf"),
    ("frog", "frogs", "croaks", 4, "near ponds", "insects", "tadpole"),
    ("mouse", "mice", "squeaks", 4, "in fields and houses", "seeds", "pup"),
    ("snake", "snakes", "hisses", 0, "in the grass", "mice", "hatchling"),
    ("bee", "bees", "buzzes", 6, "in a hive", "nectar", "larva"),
    ("cricket", "crickets", "chirps", 6, "in the grass", "plants", "nymph"),
    ("parrot", "parrots", "squawks", 2, "in the rainforest", "fruit and nuts", "chick"),
    ("dolphin", "dolphins", "clicks", 0, "in the sea", "fish", "calf"),
    ("whale", "whales", "sings", 0, "in the ocean", "small fish", "calf"),
    ("camel", "camels", "grunts", 4, "in the desert", "desert plants", "calf"),
    ("hyena", "hyenas", "whoops", 4, "on the savanna", "meat", "cub"),
    ("goat", "goats", "bleats", 4, "on farms and hills", "grass and leaves", "kid"),
]

COLOURS_OF_THINGS = [  # (thing, colour)
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
    ("a tomato", "red"), ("milk", "white"), ("a lemon", "yellow"), ("a carrot", "orange"), ("a pumpkin", "orange"),
    ("a strawberry", "red"), ("chocolate", "brown"), ("a cherry", "red"), ("a cucumber", "green"),
    ("a plum", "purple"), ("a flamingo", "pink"), ("a crow", "black"), ("a polar bear", "white"),
    ("a pea", "green"), ("soil", "brown"), ("chalk", "white"), ("the sea", "blue"), ("a fire truck", "red"),
    ("a lime", "green"), ("an aubergine", "purple"), ("a tree trunk", "brown"), ("salt", "white"),
    ("a school bus", "yellow"), ("a raven", "black"), ("a blueberry", "blue"),
    ("a sunflower", "yellow"), ("an emerald", "green"), ("a ruby", "red"), ("a sapphire", "blue"),
    ("a canary", "yellow"), ("an elephant", "grey"), ("lavender", "purple"), ("a tangerine", "orange"),
    ("a goldfish", "orange"), ("a koala", "grey"), ("a ladybird", "red"), ("a panda", "black and white"),
]
COLOURS = sorted({c for _, c in COLOURS_OF_THINGS})

OPPOSITES = [  # each word appears once, so every question has one answer
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("day", "night"), ("wet", "dry"), ("old", "new"), ("full", "empty"), ("hard", "soft"),
    ("tall", "short"), ("early", "late"), ("loud", "quiet"), ("rich", "poor"), ("clean", "dirty"),
    ("thick", "thin"), ("strong", "weak"), ("high", "low"), ("left", "right"), ("in", "out"), ("win", "lose"),
    ("push", "pull"), ("first", "last"), ("always", "never"), ("before", "after"), ("good", "bad"),
    ("near", "far"), ("inside", "outside"), ("buy", "sell"), ("give", "take"), ("begin", "end"),
    ("easy", "difficult"), ("awake", "asleep"), ("summer", "winter"), ("north", "south"), ("east", "west"),
    ("top", "bottom"), ("front", "back"), ("question", "answer"), ("laugh", "cry"), ("true", "false"),
]
OPPOSITE_OF = {a: b for a, b in OPPOSITES} | {b: a for a, b in OPPOSITES}

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # February has 29 in a leap year
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
            "tenth", "eleventh", "twelfth"]

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_to_words(n):
    """0..100 in words: 42 -> "forty-two"."""
    if n < 20:
        return ONES[n]
    if n == 100:
        return "one hundred"
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("-" + ONES[ones] if ones else "")

NUMBER_WORDS = [number_to_words(n) for n in range(101)]

FOOD_GROUPS = {
    "fruit": "apple, banana, orange, pear, plum, lemon, cherry, strawberry, peach, mango, melon, pineapple, "
             "apricot, coconut",
    "vegetable": "carrot, potato, tomato, onion, cabbage, pepper, cucumber, radish, pumpkin",
    "sweet snack": "cookie, cake, muffin, biscuit", "baked food": "pie, bread roll",
    "breakfast food": "pancake, waffle", "lunch food": "sandwich, dumpling", "nut": "walnut, almond, hazelnut",
}
FOODS = [(f, plural(f), group) for group, words in FOOD_GROUPS.items() for f in words.split(", ")]
OBJECTS = [(o, plural(o)) for o in (
    "pencil, pen, book, crayon, marble, sticker, stamp, shell, stone, balloon, kite, cup, plate, spoon, toy car, "
    "block, hat, sock, button, coin, card, flower, bead, ribbon, bottle, basket, candle, key, bell, feather, "
    "puzzle, umbrella, blanket, lantern, notebook, mitten, whistle, paintbrush, ruler, eraser, torch, clock, "
    "mirror, pillow, teapot, bucket, shovel, robot, doll, teddy bear, bracelet, jar, envelope, postcard, compass, "
    "magnet, map, ladder, hammer, rope, tent, sledge, wagon, glove, helmet, drawing").split(", ")]
THINGS = FOODS + [(s, p, "object") for s, p in OBJECTS]

JOBS = [  # (job, what they do, where they work)
    ("teacher", "teaches children", "at a school"), ("doctor", "helps sick people", "in a hospital"),
    ("nurse", "cares for patients", "in a hospital"), ("farmer", "grows food and keeps animals", "on a farm"),
    ("baker", "bakes bread and cakes", "in a bakery"), ("cook", "makes meals", "in a kitchen"),
    ("pilot", "flies planes", "in a cockpit"), ("bus driver", "drives a bus", "in the town"),
    ("builder", "builds houses", "on a building site"), ("painter", "paints pictures", "in a studio"),
    ("singer", "sings songs", "in a theatre"), ("writer", "writes books", "in a quiet room"),
    ("fisher", "catches fish", "on a boat"), ("firefighter", "puts out fires", "at a fire station"),
    ("dentist", "looks after teeth", "in a clinic"), ("vet", "cares for sick animals", "in an animal clinic"),
    ("gardener", "looks after plants", "in a garden"), ("tailor", "makes clothes", "in a workshop"),
    ("carpenter", "makes things from wood", "in a workshop"), ("librarian", "looks after books", "in a library"),
    ("postman", "brings letters", "at the post office"), ("scientist", "studies how the world works", "in a lab"),
    ("sailor", "sails ships", "at sea"), ("musician", "plays music", "in a concert hall"),
    ("shopkeeper", "sells things", "in a shop"), ("plumber", "fixes pipes", "in people's homes"),
    ("astronaut", "travels into space", "on a space station"), ("engineer", "designs machines", "in a factory"),
    ("mechanic", "repairs cars", "in a garage"), ("pharmacist", "gives out medicine", "in a pharmacy"),
    ("barber", "cuts hair", "in a barber shop"), ("zookeeper", "looks after zoo animals", "at a zoo"),
    ("lifeguard", "keeps swimmers safe", "at the beach"), ("architect", "designs buildings", "in an office"),
    ("photographer", "takes photographs", "in a studio"), ("waiter", "serves food", "in a restaurant"),
    ("potter", "makes pots from clay", "in a pottery"), ("florist", "sells flowers", "in a flower shop"),
    ("beekeeper", "looks after bees", "near the beehives"),
    ("translator", "translates between languages", "in an office"),
]

# Story ingredients.
PLACES = ["the " + p for p in (
    "park, market, beach, forest, library, school, farm, river, garden, zoo, lake, hill, bakery, museum, harbour, "
    "village, town square, mountain, meadow, castle, train station, playground, orchard, bridge, island, valley, "
    "swimming pool, cinema, waterfall, lighthouse, post office, stadium").split(", ")]
WEATHER = ["sunny", "rainy", "windy", "cloudy", "snowy", "foggy", "warm", "cold", "stormy", "bright"]
FEELINGS = ["happy", "tired", "hungry", "excited", "proud", "calm", "curious", "sleepy", "surprised", "grateful",
            "cheerful", "thirsty", "glad", "relaxed", "joyful", "amazed", "delighted", "peaceful"]
ACTIVITIES = (
    "read a book, played football, flew a kite, drew a picture, sang a song, built a sandcastle, went for a swim, "
    "planted flowers, baked a cake, rode a bicycle, watched the clouds, fed the ducks, picked berries, "
    "climbed a tree, wrote a letter, played chess, painted a fence, collected shells, skipped with a rope, "
    "made a snowman, looked at the stars, played the drum, tidied the room, helped in the kitchen, played tennis, "
    "went skating, played hide and seek, made a paper boat, watered the plants, played the violin, "
    "juggled three balls, solved a puzzle, danced to music, had a picnic").split(", ")
THING_ADJECTIVES = ["little", "big", "shiny", "old", "new", "tiny", "pretty", "colourful", "favourite",
                    "special", "dusty", "heavy", "bright", "striped", "spotted", "golden", "silver", "round"]
ANIMAL_ADJECTIVES = ["clever", "kind", "gentle", "friendly", "funny", "quiet", "brave", "fluffy", "enormous",
                     "tiny", "little", "young", "old", "sleepy", "curious", "proud", "hungry", "cheerful"]
HIDING_PLACES = ["under the bed", "in the kitchen", "behind the sofa", "in the garden", "on the shelf",
                 "in the cupboard", "under the table", "in the hallway", "next to the door", "inside a boot"]
INSTRUMENTS = ["piano", "violin", "guitar", "flute", "cello", "harp", "trumpet", "drum", "clarinet", "accordion"]
SPORTS = ["football", "tennis", "basketball", "volleyball", "badminton", "hockey", "swimming", "running",
          "cycling", "rowing", "skiing", "climbing"]
CLOTHES_FOR_WEATHER = {"rainy": "a raincoat and rubber boots", "snowy": "a warm coat, a woolly hat and mittens",
                       "sunny": "a sun hat and sunglasses", "windy": "a jacket and a scarf",
                       "cold": "a thick jumper and gloves", "warm": "shorts and sandals"}
TRANSPORT = [("train", "rode on the train"), ("bus", "took the bus"), ("ferry", "sailed on the ferry"),
             ("plane", "flew on a plane"), ("bicycle", "cycled"), ("tram", "rode on the tram")]
SEASONS = ["spring", "summer", "autumn", "winter"]
SEASON_PLANS = {"spring": "plant seeds in the garden", "summer": "swim in the lake",
                "autumn": "jump in piles of fallen leaves", "winter": "build a snowman"}
DISHES = {"vegetable soup": ["carrot", "potato", "onion", "cabbage", "tomato"],
          "fruit salad": ["apple", "banana", "orange", "pear", "strawberry", "mango", "peach"]}

# General knowledge, built once from small tables so each sentence is true.
SHAPES = [("triangle", 3), ("square", 4), ("rectangle", 4), ("pentagon", 5), ("hexagon", 6), ("octagon", 8)]
PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]  # in order from the Sun
MATERIALS = [("a table", "wood"), ("a window", "glass"), ("a book", "paper"), ("a candle", "wax"),
             ("a tyre", "rubber"), ("a brick", "clay"), ("a coin", "metal"), ("a spoon", "metal"),
             ("a T-shirt", "cotton"), ("a pencil", "wood and graphite")]
SENSES = [("see", "eyes"), ("hear", "ears"), ("smell", "noses"), ("taste", "tongues"), ("feel", "skin")]
WHEELS = [("unicycle", 1), ("bicycle", 2), ("motorbike", 2), ("tricycle", 3), ("car", 4)]
SCIENCE_FACTS = (
    [f"{cap(a_an(s))} has {ONES[n]} sides." for s, n in SHAPES] + ["A circle has no corners."]
    + [f"{p} is the {ORDINALS[i]} planet from the Sun." for i, p in enumerate(PLANETS)]
    + [f"{cap(t)} is usually made of {m}." for t, m in MATERIALS]
    + [f"We {v} with our {part}." for v, part in SENSES]
    + [f"{cap(a_an(v))} has {ONES[n]} {'wheel' if n == 1 else 'wheels'}." for v, n in WHEELS]
    + [f"After {SEASONS[i]} comes {SEASONS[(i + 1) % 4]}." for i in range(4)]
    + ["Jupiter is the largest planet.", "The Earth goes around the Sun once a year.",
       "The Moon goes around the Earth.", "A minute has sixty seconds.", "An hour has sixty minutes.",
       "A day has twenty-four hours.", "A year has three hundred and sixty-five days, or three hundred and "
       "sixty-six in a leap year.", "Water freezes into ice when it is very cold.", "Water boils when it is very hot.",
       "Plants need water and sunlight to grow.", "The Sun rises in the east and sets in the west.",
       "People have two eyes, two ears, one nose, ten fingers and ten toes.", "Fish breathe with gills.",
       "Birds have feathers and most birds can fly.", "A spider has eight legs.", "Rain falls from clouds."])

# People: a few ordinary names plus invented ones built from syllables with a fixed seed, so every
# run sees the same people. Invented names never repeat a syllable or clash with a place name.
ORDINARY_NAMES = [("Mia", "she"), ("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Lucy", "she"), ("Sam", "he"),
                  ("Emma", "she"), ("Jack", "he"), ("Lily", "she"), ("Leo", "he"), ("Sara", "she"), ("Max", "he"),
                  ("Nora", "she"), ("Oscar", "he"), ("Ella", "she"), ("Noah", "he"), ("Ruby", "she"), ("Adam", "he"),
                  ("Zoe", "she"), ("Omar", "he"), ("Maya", "she"), ("Liam", "he"), ("Ava", "she"), ("Hugo", "he"),
                  ("Iris", "she"), ("Felix", "he"), ("Rosa", "she"), ("Kai", "he"), ("Lena", "she"), ("Theo", "he")]
SYLLABLES = ["ka", "lo", "mi", "ra", "ben", "tor", "sa", "li", "no", "vel", "da", "rin", "po", "ze", "ma", "lu",
             "fen", "ta", "ri", "gor", "ne", "bo", "si", "wen", "ha", "mo", "del", "ki", "ro", "ven", "ju", "pa",
             "tem", "ya", "sol", "bi", "kar", "fi", "dun", "el", "or", "an", "is"]


def invented_names(count, seed=1234):
    rng = random.Random(seed)
    taken = {n for n, _ in ORDINARY_NAMES} | {w for row in COUNTRIES for w in row}
    names = []
    while len(names) < count:
        parts = [rng.choice(SYLLABLES) for _ in range(rng.choice((2, 2, 3)))]
        name = "".join(parts).capitalize()
        if name not in taken and len(set(parts)) == len(parts) and 4 <= len(name) <= 9:
            taken.add(name)
            names.append((name, rng.choice(("she", "he"))))
    return names

PRONOUN = dict(ORDINARY_NAMES + invented_names(280))  # name -> "she" / "he"
NAMES = list(PRONOUN)
POSSESSIVE = {"she": "her", "he": "his"}


def two_names(rng):
    """Two different people and the first one's pronoun."""
    name, friend = rng.sample(NAMES, 2)
    return name, friend, PRONOUN[name]


def sound_past(sound):
    """Past tense of an animal sound, for stories told in the past: barks -> barked, buzzes -> buzzed."""
    if sound == "sings":
        return "sang"
    if sound.endswith(("sses", "zzes")):
        return sound[:-2] + "ed"
    return sound[:-1] + ("d" if sound.endswith("les") else "ed")


def legs_sentence(animal, legs):
    return f"{cap(a_an(animal))} has {ONES[legs] if legs else 'no'} legs."


def tinyworld_split(key):
    """Stable split by a hash of the key: about 80% train, 10% val, 10% test."""
    bucket = zlib.crc32(key.encode("utf-8")) % 10
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


# -----------------------------------------------------------------------------------------------
# Fact questions. _fact returns the item and the answers of the same type, which multiple choice
# uses as distractors. The key names the fact asked about (kind and subject), never the wording,
# so a split by key keeps every phrasing of one question in the same split.

ALL_CAPITALS = [k for _, k, _ in COUNTRIES]
ALL_COUNTRIES = [c for c, _, _ in COUNTRIES]
ALL_SOUNDS = sorted({a[2] for a in ANIMALS})
ALL_YOUNG = sorted({a[6] for a in ANIMALS})
ALL_WORDS_WITH_OPPOSITES = sorted(OPPOSITE_OF)
LEG_WORDS = ["zero", "two", "four", "six", "eight"]
FACT_KINDS = ["capital", "continent", "country", "sound", "legs", "young", "colour", "opposite", "day_after",
              "day_before", "month_after", "add", "sub"]


def _fact(rng, kind):
    def item(key, templates, subject, answer, reply, pool):
        return {"key": key, "question": rng.choice(templates).format(subject), "answer": answer, "reply": reply}, pool

    if kind in ("capital", "continent", "country"):
        c, k, m = rng.choice(COUNTRIES)
        if kind == "capital":
            return item(f"capital:{c}", ["What is the capital of {}?", "Which city is the capital of {}?",
                                         "Name the capital of {}.", "What city is the capital of {}?"],
                        c, k, f"The capital of {c} is {k}.", ALL_CAPITALS)
        if kind == "continent":
            return item(f"continent:{c}", ["On which continent is {}?", "Which continent is {} in?",
                                           "{} is on which continent?"], c, m, f"{c} is in {m}.", CONTINENTS)
        return item(f"country:{k}", ["{} is the capital of which country?", "Which country has {} as its capital?",
                                     "Of which country is {} the capital?"], k, c, f"{k} is the capital of {c}.",
                    ALL_COUNTRIES)
    if kind in ("sound", "legs", "young"):
        name, _, sound, legs, _, _, young = rng.choice(ANIMALS)
        if kind == "sound":
            return item(f"sound:{name}", ["What sound does {} make?", "What noise does {} make?", "How does {} sound?"],
                        a_an(name), sound, f"{cap(a_an(name))} {sound}.", ALL_SOUNDS)
        if kind == "legs":
            return item(f"legs:{name}", ["How many legs does {} have?", "How many legs has {}?"], a_an(name),
                        ONES[legs], legs_sentence(name, legs), LEG_WORDS)
        return item(f"young:{name}", ["What is a young {} called?", "What do we call a baby {}?"], name, young,
                    f"A young {name} is called {a_an(young)}.", ALL_YOUNG)
    if kind == "colour":
        thing, colour = rng.choice(COLOURS_OF_THINGS)
        return item(f"colour:{thing}", ["What colour is {}?", "What is the colour of {}?", "Which colour is {}?"],
                    thing, colour, f"{cap(thing)} is {colour}.", COLOURS)
    if kind == "opposite":
        word = rng.choice(ALL_WORDS_WITH_OPPOSITES)
        return item(f"opposite:{word}", ["What is the opposite of {}?", "What is the opposite of the word \"{}\"?",
                                         "Tell me the opposite of {}."], word, OPPOSITE_OF[word],
                    f"The opposite of {word} is {OPPOSITE_OF[word]}.", ALL_WORDS_WITH_OPPOSITES)
    if kind == "day_after":
        i = rng.randrange(7)
        return item(f"day_after:{DAYS[i]}", ["What day comes after {}?", "Which day is after {}?"], DAYS[i],
                    DAYS[(i + 1) % 7], f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}.", DAYS)
    if kind == "day_before":
        i = rng.randrange(7)
        return item(f"day_before:{DAYS[i]}", ["What day comes before {}?", "Which day is before {}?"], DAYS[i],
                    DAYS[i - 1], f"The day before {DAYS[i]} is {DAYS[i - 1]}.", DAYS)
    if kind == "month_after":
        i = rng.randrange(12)
        return item(f"month_after:{MONTHS[i]}", ["What month comes after {}?", "Which month is after {}?"], MONTHS[i],
                    MONTHS[(i + 1) % 12], f"After {MONTHS[i]} comes {MONTHS[(i + 1) % 12]}.", MONTHS)
    # "add" / "sub": small numbers, answered in digits; differences never go below zero
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if kind == "sub":
        a, b = max(a, b), min(a, b)
    op, word, r = ("+", "plus", a + b) if kind == "add" else ("-", "minus", a - b)
    templates = [f"What is {a} {word} {b}?", f"How much is {a} {op} {b}?", f"What is {a} {op} {b}?",
                 f"Can you work out {a} {word} {b}?"]  # already filled in, so the subject is None
    return item(f"{kind}:{a}{op}{b}", templates, None, str(r), f"{a} {word} {b} is {r}.",
                [str(r + d) for d in range(-6, 7) if r + d >= 0])


def tinyworld_fact_question(rng):
    return _fact(rng, rng.choice(FACT_KINDS))[0]


def tinyworld_multiple_choice(rng):
    """MMLU-style item: the answer plus 3 distinct wrong answers of the same type, shuffled."""
    fact, pool = _fact(rng, rng.choice(FACT_KINDS))
    answer, question_words = fact["answer"], set(fact["question"].rstrip("?.").split())
    # skip options that appear in the question or inside the answer ("black" for "black and white")
    wrong = [p for p in pool if p not in answer and p not in question_words]
    choices = rng.sample(wrong, 3) + [answer]
    rng.shuffle(choices)
    return {"key": fact["key"], "question": fact["question"], "choices": choices, "answer": choices.index(answer)}


# -----------------------------------------------------------------------------------------------
# Pretraining documents. Each function writes one short paragraph; stories reuse the same facts.


def para_country(rng):
    country, capital, continent = rng.choice(COUNTRIES)
    other = rng.choice([c for c, _, k in COUNTRIES if k == continent and c != country])
    extra = [f"{capital} is a city in {country}.", f"Many people live in {capital}.",
             f"{country} and {other} are both in {continent}.", f"If you visit {capital}, you are in {country}."]
    return " ".join([f"{country} is a country in {continent}.", f"The capital of {country} is {capital}."]
                    + rng.sample(extra, rng.randint(1, 3)))


def para_continent(rng):
    continent = rng.choice(CONTINENTS)
    some = rng.sample([(c, k) for c, k, m in COUNTRIES if m == continent], rng.randint(2, 4))
    return (f"{continent} is a continent. Some countries in {continent} are {join_and([c for c, _ in some])}."
            + "".join(f" The capital of {c} is {k}." for c, k in some))


def para_animal(rng):
    name, plural_, sound, legs, home, food, young = rng.choice(ANIMALS)
    extra = [f"{cap(plural_)} live {home}.", f"{cap(plural_)} eat {food}.", f"A young {name} is called {a_an(young)}.",
             f"Have you heard {a_an(name)}? It {sound}."]
    return " ".join([f"The {name} is an animal.", f"{cap(a_an(name))} {sound}.", legs_sentence(name, legs)]
                    + rng.sample(extra, rng.randint(2, 4)))


def para_colours(rng):
    return " ".join(f"{cap(thing)} is {colour}." for thing, colour in rng.sample(COLOURS_OF_THINGS, rng.randint(3, 6)))


def para_opposites(rng):
    pairs = rng.sample(OPPOSITES, rng.randint(3, 6))
    if rng.random() < 0.5:
        return " ".join(f"The opposite of {a} is {b}." for a, b in pairs)
    return "Here are some opposites: " + ", ".join(f"{a} and {b}" for a, b in pairs) + "."


def para_days(rng):
    i = rng.randrange(7)
    order = [f"After {DAYS[(i + k) % 7]} comes {DAYS[(i + k + 1) % 7]}." for k in range(rng.randint(2, 4))]
    return " ".join(order + [rng.choice(["A week has seven days.", "Saturday and Sunday are the weekend.",
                                         f"The day before {DAYS[i]} is {DAYS[i - 1]}.",
                                         "Monday is the first day of the week."])])


def para_months(rng):
    i = rng.randrange(12)
    order = [f"After {MONTHS[(i + k) % 12]} comes {MONTHS[(i + k + 1) % 12]}." for k in range(rng.randint(1, 3))]
    length = ("February has twenty-eight days, or twenty-nine days in a leap year." if i == 1
              else f"{MONTHS[i]} has {NUMBER_WORDS[MONTH_DAYS[i]]} days.")
    return " ".join(["A year has twelve months."] + order
                    + [f"{MONTHS[i]} is the {ORDINALS[i]} month of the year.", length])


def para_counting(rng):
    style = rng.randrange(3)
    if style == 0:
        start = rng.randint(0, 90)
        nums = range(start, start + rng.randint(4, 9))
        return f"Let us count from {nums[0]} to {nums[-1]}: " + ", ".join(NUMBER_WORDS[n] for n in nums) + "."
    if style == 1:
        by = rng.choice([2, 5, 10])
        nums = range(by, by * rng.randint(5, 10) + 1, by)
        return f"Counting by {ONES[by]}s: " + ", ".join(map(str, nums)) + "."
    return " ".join(f"{cap(NUMBER_WORDS[n])} is written as {n}." for n in rng.sample(range(101), 4))


def arithmetic_fact(rng, in_words=False):
    """One true sentence of arithmetic; every number stays within 0..100 so it can be spelled out."""
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(0, 50), rng.randint(0, 50); r, word = a + b, "plus"
    elif op == "-":
        a = rng.randint(0, 100); b = rng.randint(0, a); r, word = a - b, "minus"
    elif op == "*":
        a, b = rng.randint(1, 10), rng.randint(1, 10); r, word = a * b, "times"
    else:  # build division from a product so it is always exact
        b, r = rng.randint(1, 10), rng.randint(1, 10); a, word = b * r, "divided by"
    if in_words:
        return f"{cap(NUMBER_WORDS[a])} {word} {NUMBER_WORDS[b]} is {NUMBER_WORDS[r]}."
    return f"{a} {word} {b} is {r}."


def para_arithmetic(rng):
    in_words = rng.random() < 0.3
    a, b = sorted(rng.sample(range(101), 2))
    return " ".join([arithmetic_fact(rng, in_words) for _ in range(rng.randint(3, 6))] + [f"{b} is bigger than {a}."])


def para_job(rng):
    return " ".join(f"{cap(a_an(job))} {does}. {cap(a_an(job))} works {where}."
                    for job, does, where in rng.sample(JOBS, rng.randint(2, 3)))


def para_food(rng):
    return " ".join(f"{cap(a_an(f))} is {a_an(group)}." for f, _, group in rng.sample(FOODS, rng.randint(3, 5)))


def para_science(rng):
    return " ".join(rng.sample(SCIENCE_FACTS, rng.randint(3, 5)))

# Which animals a story may meet where: any land animal at the zoo, farm animals on the farm and
# everyday animals elsewhere.
ZOO_ANIMALS = [a for a in ANIMALS if a[3] > 0 or a[0] == "snake"]
FARM_ANIMALS = [a for a in ANIMALS if "farm" in a[4]]
TOWN_HOMES = ("in houses with people", "near ponds", "near lakes", "in tall trees", "in trees and towns",
              "in fields and houses", "in the grass", "in a hive")
TOWN_ANIMALS = [a for a in ANIMALS if a[4] in TOWN_HOMES]


def story_outing(rng):
    name, friend, p = two_names(rng)
    place = rng.choice(PLACES)
    animal = rng.choice(ZOO_ANIMALS if place == "the zoo" else FARM_ANIMALS if place == "the farm" else TOWN_ANIMALS)
    return (f"On {rng.choice(DAYS)}, {name} went to {place} with {friend}. The day was "
            f"{rng.choice(WEATHER)}. There they saw {NUMBER_WORDS[rng.randint(2, 12)]} {animal[1]}. "
            f"{cap(a_an(animal[0]))} {animal[2]}. {name} and {friend} {rng.choice(ACTIVITIES)}. In the evening, "
            f"{name} went home. {cap(p)} was {rng.choice(FEELINGS)}.")


def story_market(rng):
    name, friend, p = two_names(rng)
    job, does, where = rng.choice(JOBS)
    food, foods, _ = rng.choice(FOODS)
    n = rng.randint(3, 20); m = rng.randint(1, n - 1)
    return (f"{name} is {a_an(job)}. Every day, {p} {does} {where}. One {rng.choice(MONTHS)} morning, {p} went "
            f"to the market and bought {n} {foods}. {cap(p)} gave {m} to {friend}. Now {name} has {n - m} "
            f"{foods if n - m > 1 else food} and {friend} has {m} {foods if m > 1 else food}.")


def story_trip(rng):
    name, friend, p = two_names(rng)
    (c1, k1, _), (c2, k2, m2) = rng.sample(COUNTRIES, 2)
    return (f"{name} lives in {k1}, the capital of {c1}. In {rng.choice(MONTHS)}, {p} travelled to {k2}, the "
            f"capital of {c2}. {c2} is in {m2}. {cap(p)} sent a postcard to {friend}. It said: \"Hello from {k2}! "
            f"Today I visited {rng.choice(PLACES)} and I {rng.choice(ACTIVITIES)}. See you soon, {name}.\"")


def story_dialogue(rng):
    name, friend, _ = two_names(rng)
    thing, colour = rng.choice(COLOURS_OF_THINGS)
    word, opposite = rng.choice(OPPOSITES)
    a, b = rng.randint(1, 10), rng.randint(1, 10)
    return (f"{name} asked {friend}, \"What colour is {thing}?\" {friend} said, \"{cap(thing)} is {colour}.\" "
            f"Then {friend} asked, \"What is the opposite of {word}?\" {name} said, \"The opposite of {word} is "
            f"{opposite}.\" \"What is {a} plus {b}?\" asked {friend}. \"{a} plus {b} is {a + b},\" said {name}. "
            f"They both smiled.")


def story_lost(rng):
    name, friend, p = two_names(rng)
    spots = rng.sample(HIDING_PLACES, 3)
    return (f"{name} lost {POSSESSIVE[p]} {rng.choice(THING_ADJECTIVES)} {rng.choice(OBJECTS)[0]}. {cap(p)} looked "
            f"{spots[0]} and {spots[1]}, but it was not there. {friend} came to help. \"Let us look {spots[2]},\" "
            f"said {friend}. And there it was! {name} was {rng.choice(FEELINGS)} and said, \"Thank you, {friend}!\"")


def story_fable(rng):
    (a1, _, s1, _, home, food, _), (a2, _, s2, *_) = rng.sample(ANIMALS, 2)
    name, friend, _ = two_names(rng)
    return (f"Once upon a time, there was {a_an(rng.choice(ANIMAL_ADJECTIVES))} {a1} named {name}. {name} lived {home} "
            f"and ate {food}. One {rng.choice(WEATHER)} day, {name} met {a_an(a2)} named {friend}. \"Hello,\" said "
            f"{name}, and the {a1} {sound_past(s1)}. \"Hello,\" said {friend}, and the {a2} {sound_past(s2)}. "
            f"From that day on, the {a1} and the {a2} were good friends.")


def story_counting(rng):
    name, _, p = two_names(rng)
    things = rng.choice(THINGS)[1]
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return (f"{name} has {a} red {things} and {b} blue {things}. {cap(p)} counts them all: "
            + ", ".join(NUMBER_WORDS[i] for i in range(1, a + b + 1))
            + f". {name} has {a + b} {things}, because {a} plus {b} is {a + b}.")


def story_cooking(rng):
    name, friend, p = two_names(rng)
    dish = rng.choice(sorted(DISHES))
    x, y, z = [plural(f) for f in rng.sample(DISHES[dish], 3)]
    if dish == "vegetable soup":
        how = (f"First, {p} washed the {x}, the {y} and the {z}. Then {p} cut them into small pieces and put them "
               f"in a big pot with water and a little salt. {cap(p)} stirred the soup for "
               f"{NUMBER_WORDS[rng.randint(10, 40)]} minutes.")
    else:
        how = (f"First, {p} washed and sliced {rng.randint(2, 5)} {x}. Then {p} added some {y} and {z} and mixed "
               f"everything in a bowl.")
    return (f"On {rng.choice(DAYS)}, {name} wanted to make {dish}. {how} When the {dish} was ready, {p} shared it "
            f"with {friend}. \"This {dish} is delicious!\" said {friend}.")


def train_item(make, rng):
    """An item from make(rng) whose key is in the train split: stories quote questions, and
    those asked in the held-out splits must never appear in training text."""
    while True:
        item = make(rng)
        if tinyworld_split(item["key"]) == "train":
            return item


def story_school(rng):
    name, _, p = two_names(rng)
    fact = train_item(tinyworld_fact_question, rng)
    return (f"{name} goes to school from Monday to Friday. Today the teacher asked the class, \"{fact['question']}\" "
            f"{name} put up {POSSESSIVE[p]} hand and said, \"{fact['reply']}\" \"Well done, {name}!\" said the "
            f"teacher, and {name} felt {rng.choice(FEELINGS)}.")


def story_seasons(rng):
    name, friend, _ = two_names(rng)
    i = rng.randrange(4)
    season, nxt = SEASONS[i], SEASONS[(i + 1) % 4]
    return (f"It was {season}. {name} and {friend} liked to {SEASON_PLANS[season]}. \"What comes after {season}?\" "
            f"asked {friend}. \"After {season} comes {nxt},\" said {name}. \"In {nxt} we can {SEASON_PLANS[nxt]}.\" "
            f"A year has four seasons: spring, summer, autumn and winter.")


def story_hobbies(rng):
    name, friend, _ = two_names(rng)
    (i1, i2), (s1, s2) = rng.sample(INSTRUMENTS, 2), rng.sample(SPORTS, 2)
    return (f"{name} plays the {i1} and {friend} plays the {i2}. Every {rng.choice(DAYS)}, they practise together "
            f"for {NUMBER_WORDS[rng.choice((15, 20, 30, 40, 45, 60))]} minutes. {name} also likes {s1}, but "
            f"{friend} likes {s2} more. After practice they feel {rng.choice(FEELINGS)}, and they walk home past "
            f"{rng.choice(PLACES)}.")


def story_birthday(rng):
    name, friend, p = two_names(rng)
    age, day, month = rng.randint(4, 12), rng.randint(1, 28), rng.randrange(12)
    gifts = [a_an(rng.choice(THING_ADJECTIVES) + " " + o) for o, _ in rng.sample(OBJECTS, 2)]
    return (f"{name} has a birthday on {day} {MONTHS[month]}. This year {p} is turning {NUMBER_WORDS[age]}. "
            f"{friend} wrapped {gifts[0]} in paper and tied it with a ribbon. Another friend brought {gifts[1]}. "
            f"Everyone sang, and {name} blew out {NUMBER_WORDS[age]} candles on the cake. The month after "
            f"{MONTHS[month]} is {MONTHS[(month + 1) % 12]}, and {name} was already thinking about the next party.")


def story_walk(rng):
    name, friend, p = two_names(rng)
    animal, plural_, sound, _, home, *_ = rng.choice(FARM_ANIMALS + TOWN_ANIMALS)
    return (f"{name} {rng.choice(['wandered', 'walked', 'hurried', 'strolled'])} along the path to "
            f"{rng.choice(PLACES)}. Suddenly {p} {rng.choice(['noticed', 'discovered', 'spotted'])} "
            f"{a_an(rng.choice(ANIMAL_ADJECTIVES))} {animal} "
            f"{rng.choice(['behind a rock', 'near a puddle', 'under a bush'])}. "
            f"\"Look!\" {p} {rng.choice(['whispered', 'shouted', 'called'])}. {friend} came running, and the {animal} "
            f"{sound_past(sound)}. {friend} {rng.choice(['giggled', 'nodded', 'waved', 'laughed'])}. "
            f"\"{cap(plural_)} live "
            f"{home},\" said {friend}. \"Maybe this one is lost.\"")


def story_weather(rng):
    name, friend, p = two_names(rng)
    weather = rng.choice(sorted(CLOTHES_FOR_WEATHER))
    vehicle, went = rng.choice(TRANSPORT)
    return (f"The morning was {weather}, so {name} put on {CLOTHES_FOR_WEATHER[weather]}. Then {p} {went} to "
            f"{rng.choice(PLACES)} to meet {friend}. \"Why did you come by {vehicle}?\" asked {friend}. \"Because "
            f"it is quick,\" said {name}. They {rng.choice(ACTIVITIES)} until the evening.")


def story_shop(rng):
    name, friend, p = two_names(rng)
    (a, _), (b, _) = rng.sample(OBJECTS, 2)
    x, y = rng.randint(1, 20), rng.randint(1, 20)
    return (f"{name} went to a small shop with {friend}. {cap(a_an(rng.choice(THING_ADJECTIVES) + ' ' + a))} cost {x} "
            f"dollars and {a_an(b)} cost {y} dollars. {name} bought both, so {p} paid {x} plus {y}, which is {x + y} "
            f"dollars. The shopkeeper said, \"Thank you, come again!\"")

PARAGRAPHS = [para_country, para_continent, para_animal, para_colours, para_opposites, para_days, para_months,
              para_counting, para_arithmetic, para_job, para_food, para_science]
STORIES = [story_outing, story_market, story_trip, story_dialogue, story_lost, story_fable, story_counting,
           story_cooking, story_school, story_seasons, story_hobbies, story_birthday, story_walk, story_weather,
           story_shop]


def tinyworld_document(rng):
    """One pretraining document: 1-6 paragraphs separated by blank lines, a bit under half of them stories."""
    count = rng.choice((1, 2, 3, 3, 4, 4, 5, 6))  # favour 3-4 so most documents are 300-1500 characters
    return "\n\n".join((rng.choice(STORIES) if rng.random() < 0.45 else rng.choice(PARAGRAPHS))(rng)
                       for _ in range(count))


# -----------------------------------------------------------------------------------------------
# Conversations for SFT.

IDENTITY = [
    ("Who are you?", "I am nanochat-one, a tiny language model trained on TinyWorld."),
    ("What is your name?", "My name is nanochat-one. I am a tiny language model trained on TinyWorld."),
    ("Who made you?", "I was made as a small teaching project. I am nanochat-one, a tiny language model trained "
                      "on TinyWorld."),
    ("Are you a person?", "No. I am nanochat-one, a tiny language model trained on TinyWorld."),
    ("What are you?", "I am a tiny language model called nanochat-one. I was trained on TinyWorld."),
    ("What do you know about?", "I know simple facts about countries, capitals, animals, colours, opposites, days, "
                                "months and numbers. I was trained on TinyWorld."),
]
SMALL_TALK = [
    ("Hello!", "Hello! How can I help you today?"), ("Hi there.", "Hi! What would you like to know?"),
    ("How are you?", "I am fine, thank you. What would you like to know?"),
    ("Good morning!", "Good morning! How can I help?"), ("Thank you!", "You are welcome!"),
    ("Goodbye!", "Goodbye! Have a nice day."), ("Can you help me?", "Yes, of course. What is your question?"),
    ("What can you do?", "I can answer simple questions about countries, animals, colours, numbers, days and months."),
]


def tinyworld_conversation(rng):
    style = rng.random()
    if style < 0.2:
        n = rng.randrange(len(IDENTITY))
        turns, key = [IDENTITY[n]], f"identity:{n}"
        if rng.random() < 0.3:  # sometimes a greeting first, so identity questions also come mid-chat
            turns.insert(0, rng.choice(SMALL_TALK[:4]))
    elif style < 0.3:
        n = rng.randrange(len(SMALL_TALK))
        turns, key = [SMALL_TALK[n]], f"chat:{n}"
    else:  # one fact question, or two or three in a row
        facts = [tinyworld_fact_question(rng) for _ in range(1 if style < 0.65 else rng.randint(2, 3))]
        turns, key = [(f["question"], f["reply"]) for f in facts], "|".join(f["key"] for f in facts)
    messages = [m for user, assistant in turns
                for m in ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})]
    return {"key": key, "messages": messages}


# -----------------------------------------------------------------------------------------------
# GSM8K-style word problems. Each template picks its numbers so that every result is a whole
# number in 0..1000 (division is built from a product), and writes each calculator call as
# <<expr=result>> the way GSM8K does.


def calc(a, op, b):
    """One calculator call: the step ("12 + 7", 19) and its GSM8K text "<<12+7=19>>19"."""
    r = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return (f"{a} {op} {b}", r), f"<<{a}{op}{b}={r}>>{r}"


def wp_buy_give(rng, name, friend, p, items):
    a, b = rng.randint(3, 40), rng.randint(2, 30); c = rng.randint(1, a + b)
    (s1, t1), (s2, t2) = calc(a, "+", b), calc(a + b, "-", c)
    q = (f"{name} has {a} {items}. {cap(p)} buys {b} more {items} and then gives {c} to {friend}. "
         f"How many {items} does {name} have now?")
    t = (f"{name} starts with {a} {items}. After buying {b} more {p} has {t1} {items}. "
         f"After giving {c} to {friend} {p} has {t2} {items}.")
    return q, [s1, s2], t, (a, b, c)


def wp_share(rng, name, friend, p, items):
    n, k = rng.randint(2, 9), rng.randint(2, 12)
    s1, t1 = calc(n * k, "/", n)
    q = f"{name} has {n * k} {items} and shares them equally among {n} friends. How many {items} does each friend get?"
    return q, [s1], f"Each friend gets {n * k} / {n} = {t1} {items}.", (n, k)


def wp_groups(rng, name, friend, p, items):
    g, k = rng.randint(2, 12), rng.randint(2, 12); c = rng.randint(1, g * k)
    (s1, t1), (s2, t2) = calc(g, "*", k), calc(g * k, "-", c)
    q = (f"There are {g} boxes with {k} {items} in each box. {name} takes {c} {items} out. "
         f"How many {items} are left in the boxes?")
    t = f"At first there are {g} x {k} = {t1} {items}. After {name} takes {c} out, {t2} are left."
    return q, [s1, s2], t, (g, k, c)


def wp_money(rng, name, friend, p, items):
    x, y = rng.randint(1, 30), rng.randint(1, 30); m = rng.randint(x + y, 100)
    (s1, t1), (s2, t2) = calc(x, "+", y), calc(m, "-", x + y)
    q = (f"{name} has {m} dollars. {cap(p)} spends {x} dollars on {items} and {y} dollars on a present for "
         f"{friend}. How much money does {p} have left?")
    t = f"{name} spends {x} + {y} = {t1} dollars. {cap(p)} has {m} - {x + y} = {t2} dollars left."
    return q, [s1, s2], t, (m, x, y)


def wp_ages(rng, name, friend, p, items):
    a, b, c = rng.randint(3, 40), rng.randint(1, 30), rng.randint(1, 20)
    (s1, t1), (s2, t2) = calc(a, "+", b), calc(a + b, "+", c)
    q = f"{name} is {a} years old. {friend} is {b} years older than {name}. How old will {friend} be in {c} years?"
    return q, [s1, s2], f"{friend} is now {a} + {b} = {t1} years old. In {c} years {friend} will be {t2}.", (a, b, c)


def wp_change(rng, name, friend, p, items):
    price, n = rng.randint(2, 9), rng.randint(2, 9)
    bill = rng.choice([b for b in (20, 50, 100) if b >= price * n])
    (s1, t1), (s2, t2) = calc(n, "*", price), calc(bill, "-", n * price)
    q = (f"One of the {items} costs {price} dollars. {name} buys {n} of them and pays with {bill} dollars. "
         f"How much change does {p} get?")
    t = f"The {items} cost {n} x {price} = {t1} dollars. The change is {bill} - {n * price} = {t2} dollars."
    return q, [s1, s2], t, (price, n, bill)


def wp_reading(rng, name, friend, p, items):
    per_day, days, before = rng.randint(2, 25), rng.randint(2, 14), rng.randint(0, 60)
    (s1, t1), (s2, t2) = calc(per_day, "*", days), calc(before, "+", per_day * days)
    q = (f"{name} had read {before} pages of a book. Then {p} read {per_day} pages every day for {days} days. "
         f"How many pages has {p} read in total?")
    t = f"In {days} days {p} reads {t1} pages. With the first {before} pages that makes {t2} pages."
    return q, [s1, s2], t, (per_day, days, before)


def wp_bags(rng, name, friend, p, items):
    k, bags = rng.randint(2, 10), rng.randint(2, 12)
    a = rng.randint(1, k * bags - 1); b = k * bags - a
    (s1, t1), (s2, t2) = calc(a, "+", b), calc(a + b, "/", k)
    q = (f"{name} collects {a} {items} and {friend} collects {b} {items}. They put all of them into bags of {k}. "
         f"How many bags do they fill?")
    return q, [s1, s2], f"Together they have {t1} {items}. In bags of {k} that makes {t2} bags.", (a, b, k)


def wp_bakery(rng, name, friend, p, items):
    k, boxes, sold = rng.randint(2, 8), rng.randint(2, 15), rng.randint(1, 40)
    total = k * boxes + sold; morning = rng.randint(1, total - 1)
    afternoon = total - morning
    (s1, t1), (s2, t2), (s3, t3) = calc(morning, "+", afternoon), calc(total, "-", sold), calc(total - sold, "/", k)
    q = (f"{name} makes {morning} {items} in the morning and {afternoon} {items} in the afternoon. {cap(p)} "
         f"sells {sold} of them and packs the rest in boxes of {k}. How many boxes does {p} fill?")
    t = f"{name} makes {t1} {items}. After selling {sold}, {t2} are left. In boxes of {k} that fills {t3} boxes."
    return q, [s1, s2, s3], t, (morning, afternoon, sold, k)

WORD_PROBLEMS = [wp_buy_give, wp_share, wp_groups, wp_money, wp_ages, wp_change, wp_reading, wp_bags, wp_bakery]
# Small things one can count, carry in bags and share; food is what a baker makes.
SMALL_ITEMS = [p for _, p, _ in FOODS] + ("pencils crayons marbles stickers stamps shells stones beads buttons coins "
                                          "cards feathers ribbons balloons flowers").split()
BAKED_ITEMS = [p for _, p, group in FOODS if group in ("sweet snack", "baked food", "breakfast food", "lunch food")]


def tinyworld_word_problem(rng):
    template = rng.choice(WORD_PROBLEMS)
    name, friend, p = two_names(rng)
    items = rng.choice(BAKED_ITEMS if template is wp_bakery else SMALL_ITEMS)
    question, steps, text, numbers = template(rng, name, friend, p, items)
    answer = steps[-1][1]
    return {"key": f"wp:{template.__name__[3:]}:{','.join(map(str, numbers))}", "question": question,
            "steps": steps, "answer_text": f"{text}\n#### {answer}", "answer": answer}


# -----------------------------------------------------------------------------------------------
# Data: document streams (TinyWorld or local/real parquet shards with a `text` column)

def tinyworld_documents(split, start=0):
    """Yield (position, text) forever. Document i is generated from its own seed and belongs to
    one split by a stable hash of its index, so every run sees the same documents in order."""
    i = start
    while True:
        if tinyworld_split(f"doc:{i}") == split:
            yield i, tinyworld_document(random.Random(i))
        i += 1


def parquet_files(data_dir):
    files = sorted(Path(data_dir).glob("*.parquet"))
    if len(files) < 2:
        raise UserError(f"found {len(files)} parquet files in {data_dir}: need at least 2 "
                        "(the last one is the validation shard); pass --data-dir with FineWeb-EDU style shards")
    return files


def parquet_documents(data_dir, split, start=0):
    """Yield (position, text) from parquet shards: every shard but the last is train, the last
    is val (and test). Position counts documents, so a resumed run skips what it has seen."""
    import pyarrow.parquet as pq  # installed with `datasets`; only needed for real data
    files = parquet_files(data_dir)
    files = files[:-1] if split == "train" else files[-1:]
    position = 0
    while True:  # loop over the shards forever (epochs)
        for path in files:
            pf = pq.ParquetFile(path)
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                if position + n <= start:
                    position += n  # skip the whole row group without reading it
                    continue
                for text in pf.read_row_group(group, columns=["text"]).column("text").to_pylist():
                    if position >= start:
                        yield position, text
                    position += 1
        if split != "train":
            return


FINEWEB_SHARD_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{index:05d}.parquet"
FINEWEB_VAL_SHARD = 1822  # the dataset's last shard: always the validation shard


def base_data_dir(args):
    """The folder of base-data shards: --data-dir, else <base_dir>/base_data (filled by download_shards)."""
    return Path(args.data_dir) if args.data_dir else base_dir() / "base_data"


def download_shards(directory, num_shards, url=FINEWEB_SHARD_URL, val_shard=FINEWEB_VAL_SHARD, attempts=5, first_wait_s=1.0):
    """Download training shards 0 .. num_shards-2 and the validation shard into directory.

    The validation shard is pinned to the dataset's last one, so runs with any number of shards
    validate on the same text; its name also sorts last, which is how parquet_files finds it.
    Shards already there are skipped. Each new one is written under a temporary name (not
    *.parquet) and renamed when complete, so an interrupted download never leaves a truncated
    shard. A failed request is retried after 1, 2, 4, 8 s (exponential backoff)."""
    import shutil
    import urllib.request  # the standard library is enough for plain HTTPS downloads
    if num_shards < 2:
        raise UserError(f"--num-shards must be at least 2 (training shards + the validation shard), got {num_shards}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    indices = list(range(min(num_shards - 1, val_shard))) + [val_shard]
    missing = [i for i in indices if not (directory / f"shard_{i:05d}.parquet").exists()]
    for n, index in enumerate(missing, 1):
        path, source = directory / f"shard_{index:05d}.parquet", url.format(index=index)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(source, timeout=60) as response, open(tmp, "wb") as f:
                    shutil.copyfileobj(response, f, 1 << 20)
                os.replace(tmp, path)
                break
            except OSError as e:  # URLError, HTTPError, timeouts and dropped connections are all OSErrors
                tmp.unlink(missing_ok=True)
                reason = getattr(e, "reason", None) or e
                if attempt == attempts - 1:
                    raise UserError(f"could not download {source} after {attempts} attempts ({reason}); to train "
                                    "without network, put FineWeb-EDU style parquet shards (a `text` column; the last "
                                    "file by name is the validation shard) in a folder and pass --data-dir FOLDER") from None
                wait = first_wait_s * 2 ** attempt
                print0(f"download of {path.name} failed ({reason}); retrying in {wait:.0f}s")
                time.sleep(wait)
        print0(f"downloaded {path} ({n}/{len(missing)})")


def prepare_base_data(args, ddp):
    """--data hf without --data-dir: rank 0 downloads --num-shards shards into <base_dir>/base_data
    (the shards already there are kept) while the other ranks wait."""
    if args.data != "hf" or args.data_dir:
        return
    if ddp.is_master:
        download_shards(base_data_dir(args), args.num_shards)
    if ddp.is_ddp:
        dist.barrier()


def document_stream(args, split, start=0):
    if args.data == "tinyworld":
        return tinyworld_documents(split, start)
    return parquet_documents(base_data_dir(args), split, start)


# -----------------------------------------------------------------------------------------------
# Data: chat tasks (conversations, multiple choice, word problems with the calculator)

LETTERS = "ABCDEFGHIJ"


def multiple_choice_conversation(question, choices, answer=None):
    """MMLU-style item as a conversation whose answer is a single letter:
    user "What is the capital of Japan?\\nA. Seoul\\nB. Tokyo\\n...\\nAnswer with the letter." -> assistant "B"."""
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    messages = [dict(role="user", content=f"{question}\n{options}\nAnswer with the letter.")]
    if answer is not None:
        messages.append(dict(role="assistant", content=LETTERS[answer]))
    return dict(messages=messages)


def calculator_parts(answer_text):
    """GSM8K's calculator spans become tool calls:
    "So 4*9 = <<4*9=36>>36 dollars." -> [text "So 4*9 = ", python "4*9", python_output "36", text "36 dollars."]"""
    parts, last = [], 0
    for match in re.finditer(r"<<([^<>=]*)=([^<>]*)>>", answer_text):
        if match.start() > last:
            parts.append(dict(type="text", text=answer_text[last:match.start()]))
        parts.append(dict(type="python", text=match.group(1)))
        parts.append(dict(type="python_output", text=match.group(2)))
        last = match.end()
    if last < len(answer_text):
        parts.append(dict(type="text", text=answer_text[last:]))
    return parts


def word_problem_conversation(question, answer_text=None):
    messages = [dict(role="user", content=question)]
    if answer_text is not None:
        messages.append(dict(role="assistant", content=calculator_parts(answer_text)))
    return dict(messages=messages)


def tinyworld_multiple_choice_chat(rng):
    item = tinyworld_multiple_choice(rng)
    return dict(key=item["key"], **multiple_choice_conversation(item["question"], item["choices"], item["answer"]))


def tinyworld_word_problem_chat(rng):
    item = tinyworld_word_problem(rng)
    return dict(key=item["key"], **word_problem_conversation(item["question"], item["answer_text"]))


# the mixture of TinyWorld chat tasks: generator -> weight
CHAT_TASKS = {tinyworld_conversation: 4, tinyworld_multiple_choice_chat: 2, tinyworld_word_problem_chat: 2}


def tinyworld_chat_examples(split, start=0):
    """Yield (position, conversation) forever: a weighted mixture of the chat tasks. Example i
    comes from its own seed; it is kept only if its fact's key hashes into `split`, so a fact
    asked in the test split was never asked in training (it may appear in pretraining text)."""
    makers, weights = list(CHAT_TASKS), list(CHAT_TASKS.values())
    i = start
    while True:
        rng = random.Random(f"chat-{i}")
        conversation = rng.choices(makers, weights)[0](rng)
        if tinyworld_split(conversation["key"]) == split:
            yield i, conversation
        i += 1


def tinyworld_eval_items(task, split="test", n=200, seed=0):
    """n distinct held-out items of one task ("fact", "multiple_choice" or "word_problem")."""
    make = dict(fact=tinyworld_fact_question, multiple_choice=tinyworld_multiple_choice,
                word_problem=tinyworld_word_problem)[task]
    rng, items, seen = random.Random(f"eval-{task}-{seed}"), [], set()
    for _ in range(100 * n):
        item = make(rng)
        if tinyworld_split(item["key"]) == split and item["question"] not in seen:
            seen.add(item["question"])
            items.append(item)
            if len(items) == n:
                break
    return items


# Real chat data: SmolTalk-style conversations, MMLU auxiliary train and GSM8K, read with HF
# `datasets` from a local folder (--data-dir with smoltalk/, mmlu/, gsm8k/ holding parquet or
# jsonl files in the hub's schemas), or from the hub when online.

HUB_CHAT_DATASETS = dict(  # name -> (hub path, config, split for train / for test)
    smoltalk=("HuggingFaceTB/smol-smoltalk", None, ("train", "test")),
    mmlu=("cais/mmlu", "auxiliary_train", ("train", "train")),
    gsm8k=("openai/gsm8k", "main", ("train", "test")),
)


def load_chat_dataset(name, split, data_dir):
    import datasets  # heavy; only imported for real data
    local = Path(data_dir or ".") / name
    files = sorted(local.glob(f"{split}*.parquet")) + sorted(local.glob(f"{split}*.jsonl")) if local.is_dir() else []
    if files:
        kind = "parquet" if files[0].suffix == ".parquet" else "json"
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    path, config, splits = HUB_CHAT_DATASETS[name]
    try:
        return datasets.load_dataset(path, config, split=splits[split != "train"])
    except Exception as e:
        raise UserError(f"could not load {name} ({path}) from the hub ({type(e).__name__}); for offline use put "
                        f"{split}*.parquet or {split}*.jsonl files in {local}/") from None


def hf_chat_examples(args, split, start=0):
    """Yield (position, conversation) from SmolTalk, MMLU and GSM8K, interleaved round-robin."""
    sources = []
    for name in HUB_CHAT_DATASETS:
        rows = load_chat_dataset(name, split, args.data_dir)
        if name == "smoltalk":
            convert = lambda row: dict(messages=row["messages"])
        elif name == "mmlu":
            convert = lambda row: multiple_choice_conversation(row["question"], row["choices"], row["answer"])
        else:
            convert = lambda row: word_problem_conversation(row["question"], row["answer"])
        sources.append((rows, convert))
    position = start
    while True:
        rows, convert = sources[position % len(sources)]
        yield position, dict(key=str(position), **convert(rows[(position // len(sources)) % len(rows)]))
        position += 1


def chat_examples(args, split, start=0):
    if args.data == "tinyworld":
        return tinyworld_chat_examples(split, start)
    return hf_chat_examples(args, split, start)


# -----------------------------------------------------------------------------------------------
# Model: GPT with rotary embeddings, QK-norm, ReLU^2 MLP, untied head and logit softcap
#
# Departures from the textbook GPT-2, each for a reason:
# - RMSNorm with no learnable weights: as good in practice, fewer parameters to think about.
# - Norm right after the embedding and on q and k (QK-norm): keeps attention logits bounded,
#   which makes training stable at high learning rates.
# - Rotary position embeddings instead of learned positions: relative, no extra parameters.
# - ReLU^2 instead of GELU: slightly better in speedruns, and simpler.
# - Untied wte / lm_head, zero-initialised output projections: each block starts as identity.
# - No biases anywhere.
# - Logits softcapped with 15*tanh(x/15), in fp32: stops logits from running away.

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (fewer than n_head is grouped-query attention)
    n_embd: int = 768


def config_from_depth(depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=128, n_kv_head=None):
    """The depth dial: width = depth * aspect_ratio rounded up to whole heads."""
    if depth < 1:
        raise UserError(f"--depth must be at least 1, got {depth}")
    if head_dim < 2 or head_dim % 2:
        raise UserError(f"--head-dim must be a positive even number (rotary pairs dimensions), got {head_dim}")
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = n_embd // head_dim
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if n_kv_head < 1 or n_head % n_kv_head:
        raise UserError(f"--n-kv-head {n_kv_head} must divide the number of heads ({n_head} at depth {depth})")
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    """Rotate pairs (x1[i], x2[i]) of the two halves of the head dimension by position-dependent
    angles. x: (B, H, T, D), cos/sin: (1, 1, T, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = -x1 * sin + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer, filled as tokens are decoded.
    k, v: (n_layer, B, n_kv_head, max_len, head_dim); pos = how many positions are filled."""

    def __init__(self, batch_size, n_kv_head, head_dim, max_len, n_layer, device, dtype):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def insert(self, layer, k, v):
        """Store this step's k, v (B, H, T, D) for one layer; return all keys/values so far."""
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.k.size(3):
            raise ValueError(f"KV cache is full ({self.k.size(3)} positions)")
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        if layer == self.k.size(0) - 1:
            self.pos = t1  # the last layer advances the position
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q).to(v.dtype), norm(k).to(v.dtype)  # QK-norm (autocast may run norms in fp32)
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = kv_cache.insert(self.layer_idx, k, v)  # (B, Hkv, Tk, D), all positions so far
            Tk = k.size(2)
            if T == 1:  # one new token attends to everything before it
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:  # T new tokens after Tk - T cached ones: query i sees keys 0 .. Tk - T + i
                mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables for 10x the training length (generation may run longer); buffers that
        # are not saved, so the state dict holds exactly the parameters
        self.rotary_len = config.sequence_len * 10
        cos, sin = self.rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def rotary_tables(self, length, base=10000, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (T, D/2)
        return angles.cos()[None, None], angles.sin()[None, None]  # (1, 1, T, D/2)

    @torch.no_grad()
    def init_weights(self):
        # wte ~ N(0, 1); matrices that read the residual stream ~ N(0, s) with
        # s = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)); the output projections and lm_head
        # start at zero, so at init every block is the identity and the model predicts uniform.
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                fan_out, fan_in = linear.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                torch.nn.init.normal_(linear.weight, mean=0.0, std=std)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        torch.nn.init.zeros_(self.lm_head.weight)
        cos, sin = self.rotary_tables(self.rotary_len, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul parameter (2 forward, 4 backward) plus attention
        scores and values, 12 * n_layer * n_head * head_dim * T (the embedding lookup is free)."""
        c = self.config
        matmul_params = sum(p.numel() for p in self.parameters()) - self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        t0 = kv_cache.pos if kv_cache is not None else 0
        if t0 + T > self.rotary_len:
            raise ValueError(f"sequence of {t0 + T} tokens is longer than the rotary table ({self.rotary_len})")
        cos, sin = self.cos[:, :, t0:t0 + T], self.sin[:, :, t0:t0 + T]
        with autocast():
            x = norm(self.transformer.wte(idx))  # (B, T, C)
            for block in self.transformer.h:
                x = block(x, cos, sin, kv_cache)
            x = norm(x)
            logits = self.lm_head(x)  # (B, T, vocab)
        logits = logits.float()  # the softcap and the loss in fp32
        logits = 15 * torch.tanh(logits / 15)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)


# -----------------------------------------------------------------------------------------------
# Optimizers: Muon for the matrices inside the blocks, AdamW for the embedding and the head

@torch.no_grad()
def newton_schulz_orthogonalize(G, steps=5):
    """Push every singular value of G towards 1 (keeping its singular vectors), i.e. an
    approximate U V^T of G = U S V^T, with a quintic Newton-Schulz iteration.

    The coefficients (a, b, c) = (3.4445, -4.7750, 2.0315) make the iteration climb fast from
    small singular values rather than converge exactly: after 5 steps the singular values lie
    roughly in [0.7, 1.2], not at 1. That is good enough for an optimizer update and much
    cheaper than an SVD. It runs in bf16 on GPUs."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # work with the short side first: X @ X.T is then the small matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values now <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz.

    For each 2-D weight: Nesterov momentum on the gradient, then replace the update by its
    orthogonalisation (all singular values ~1), scaled by sqrt(max(1, rows/cols)). Every
    direction of the matrix moves by a similar amount, which trains transformer matrices faster
    than Adam. Not for embeddings, the output head or 1-D parameters: use AdamW for those.
    Under DDP the gradients are already averaged, so every rank computes the same update."""

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])  # buf = m * buf + (1 - m) * grad
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov: look one step ahead
                update = newton_schulz_orthogonalize(update, group["ns_steps"])
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                p.add_(update, alpha=-group["lr"] * scale)


def setup_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0):
    """Muon for every matrix in the blocks; AdamW for wte and lm_head, whose learning rates are
    scaled by (n_embd/768)^-0.5 (tuned at width 768, wider models take smaller steps).
    Returns [adamw, muon]; each group remembers its base lr in "initial_lr" for the schedule."""
    matrices = list(model.transformer.h.parameters())
    scale = (model.config.n_embd / 768) ** -0.5
    adamw = torch.optim.AdamW(
        [dict(params=[model.transformer.wte.weight], lr=embedding_lr * scale),
         dict(params=[model.lm_head.weight], lr=unembedding_lr * scale)],
        betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, fused=DEVICE_TYPE == "cuda")
    muon = Muon(matrices, lr=matrix_lr, momentum=0.95)
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adamw, muon]


def lr_multiplier(step, num_steps, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Warm up linearly, hold, then decay linearly to final_lr_frac over the last warmdown_ratio."""
    warmup, warmdown = round(warmup_ratio * num_steps), round(warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step < num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step):
    """Muon's momentum ramps from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def apply_schedules(optimizers, step, num_steps, args):
    lrm = lr_multiplier(step, num_steps, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum(step)
    return lrm


# -----------------------------------------------------------------------------------------------
# Loaders

def pack_rows(docs, B, T, buffer_size=256):
    """BOS-aligned best-fit packing. docs yields (position, token list starting with BOS).
    Yields (rows, position): rows is B lists of exactly T + 1 tokens, position the stream
    position of the last document drawn (to resume from).

    Each row starts with the longest document in a buffer, then repeatedly takes the largest
    one that still fits; when none fits, the shortest document is cropped to fill the row
    exactly. So every row starts with BOS (a document start), no padding is ever needed, few
    tokens are cropped away, and long documents are not starved by short ones."""
    buffer, position = [], 0
    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    position, doc = next(docs)
                    buffer.append(doc)
                space = T + 1 - len(row)
                fitting = [i for i, d in enumerate(buffer) if len(d) <= space]
                if not row:  # a new row starts with the longest document (cropped if longer than a row)
                    i = max(range(len(buffer)), key=lambda i: len(buffer[i]))
                elif fitting:  # then the largest document that still fits
                    i = max(fitting, key=lambda i: len(buffer[i]))
                else:  # the gap at the end is filled with a crop of the shortest document
                    i = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                row.extend(buffer.pop(i)[:space])
            rows.append(row)
        yield rows, position


def base_batches(args, tokenizer, split, B, T, ddp, device, start=0):
    """Yield (inputs, targets, position) for pretraining: (B, T) tensors, targets = inputs
    shifted left by one. Documents are sharded across ranks by position."""
    bos = tokenizer.special_tokens["<|bos|>"]

    def docs():
        for position, text in document_stream(args, split, start):
            if position % ddp.world_size == ddp.rank:
                yield position, [bos] + tokenizer.encode_ordinary(text)

    for rows, position in pack_rows(docs(), B, T):
        batch = torch.tensor(rows, dtype=torch.long)
        inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True), position


def mid_batches(args, tokenizer, split, B, T, ddp, device, start=0):
    """Mid-training batches: conversations packed like documents (BOS-aligned best fit), with
    the loss on every token except the calculator's outputs, which are never trained on."""
    output_start, output_end = tokenizer.special_tokens["<|output_start|>"], tokenizer.special_tokens["<|output_end|>"]

    def docs():
        for position, conversation in chat_examples(args, split, start):
            if position % ddp.world_size == ddp.rank:
                ids, _ = render_conversation(tokenizer, conversation)
                inside_output, pairs = False, []  # (token, trained on?)
                for token in ids:
                    inside_output = inside_output or token == output_start
                    pairs.append((token, not inside_output))
                    inside_output = inside_output and token != output_end
                yield position, pairs

    for rows, position in pack_rows(docs(), B, T):
        ids = torch.tensor([[token for token, _ in row] for row in rows], dtype=torch.long)  # (B, T+1)
        trained = torch.tensor([[flag for _, flag in row] for row in rows], dtype=torch.bool)
        inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].masked_fill(~trained[:, 1:], -1)
        yield inputs.to(device), targets.to(device), position


def sft_batches(args, tokenizer, split, B, T, ddp, device, start=0):
    """SFT batches: one conversation per row, cropped to T + 1 tokens and padded on the right;
    targets are -1 (ignored) wherever the render mask is 0 and on the padding."""
    bos = tokenizer.special_tokens["<|bos|>"]
    examples = ((p, c) for p, c in chat_examples(args, split, start) if p % ddp.world_size == ddp.rank)
    while True:
        rows, position = [], start
        for position, conversation in itertools.islice(examples, B):
            rows.append(render_conversation(tokenizer, conversation, max_tokens=T + 1))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((B, width), bos, dtype=torch.long)
        targets = torch.full((B, width), -1, dtype=torch.long)
        for i, (row_ids, mask) in enumerate(rows):
            ids[i, :len(row_ids)] = torch.tensor(row_ids)
            targets[i, :len(row_ids)] = torch.tensor(row_ids).masked_fill(torch.tensor(mask) == 0, -1)
        yield ids[:, :-1].contiguous().to(device), targets[:, 1:].contiguous().to(device), position


# -----------------------------------------------------------------------------------------------
# Engine: sampling with a KV cache, and the calculator tool

def calculator(expression, max_length=200, max_exponent=64, max_magnitude=10**60):
    """Evaluate arithmetic safely: returns (True, result text) or (False, reason).

    The text is parsed with `ast` and walked by hand: only numbers, + - * / // % **, unary
    signs and parentheses are allowed, with bounded input length, exponents and intermediate
    sizes. Nothing is ever executed, so names, calls, attributes and strings are refused."""
    import ast
    import operator
    import warnings
    if len(expression) > max_length:
        return False, f"refused: expression longer than {max_length} characters"
    binary = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
    unary = {ast.UAdd: operator.pos, ast.USub: operator.neg}

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = node.value
        elif isinstance(node, ast.UnaryOp) and type(node.op) in unary:
            value = unary[type(node.op)](walk(node.operand))
        elif isinstance(node, ast.BinOp) and type(node.op) in binary:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > max_exponent:
                raise ValueError(f"exponent larger than {max_exponent}")
            value = binary[type(node.op)](left, right)
        else:
            raise ValueError(f"{type(node).__name__} is not allowed (only numbers and + - * / // % **)")
        if isinstance(value, complex) or abs(value) > max_magnitude:
            raise ValueError("result too large")
        return value

    try:
        with warnings.catch_warnings():  # text like "3x" would make the parser warn on stderr
            warnings.simplefilter("ignore")
            tree = ast.parse(expression.strip(), mode="eval")
        value = walk(tree)
    except SyntaxError:
        return False, "refused: not an arithmetic expression"
    except (ValueError, ZeroDivisionError, OverflowError) as e:
        return False, f"refused: {e}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return False, "refused: result is not a finite number"
        value = int(value) if value.is_integer() else round(value, 6)
    return True, str(value)


def sample_next(logits, rng, temperature=1.0, top_k=None):
    """Pick one token per row of logits (B, vocab): greedy at temperature 0, else sample from
    softmax(logits / temperature), optionally only among the top_k most likely tokens."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


class Engine:
    """Batched generation with a KV cache and calculator tool use.

    One forward over the prompt (repeated num_samples times) fills the cache; then each step
    feeds only the newest token of every row. Each row samples its own tokens, the first one
    included. When a row writes <|python_start|> expression <|python_end|>, the engine
    evaluates the expression with `calculator` and forces <|output_start|> result
    <|output_end|> into that row, token by token, instead of sampling."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        s = tokenizer.special_tokens
        self.python_start, self.python_end = s["<|python_start|>"], s["<|python_end|>"]
        self.output_start, self.output_end = s["<|output_start|>"], s["<|output_end|>"]
        self.stop_tokens = {s["<|assistant_end|>"], s["<|bos|>"]}

    @torch.no_grad()
    def generate(self, prompt, num_samples=1, max_tokens=64, temperature=1.0, top_k=None, seed=42):
        """Yield, step by step, (tokens, sampled): the next token of every row, and for each
        whether it was sampled (True) or forced by the tool (False). Stops when every row has
        emitted a stop token (<|assistant_end|> or <|bos|>) or after max_tokens."""
        model, device = self.model, self.model.cos.device
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        c = model.config
        cache = KVCache(num_samples, c.n_kv_head, c.n_embd // c.n_head, len(prompt) + max_tokens,
                        c.n_layer, device, COMPUTE_DTYPE)
        ids = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)  # (B, T)
        logits = model(ids, kv_cache=cache)[:, -1, :]  # (B, vocab)
        forced = [[] for _ in range(num_samples)]  # tokens queued by the tool, per row
        expression = [None] * num_samples  # tokens of a calculator call being written, per row
        done = [False] * num_samples
        for _ in range(max_tokens):
            sampled_ids = sample_next(logits, rng, temperature, top_k).tolist()
            sampled = [not queue for queue in forced]
            tokens = [queue.pop(0) if queue else token for queue, token in zip(forced, sampled_ids)]
            yield tokens, sampled
            for row, token in enumerate(tokens):
                if done[row]:
                    continue
                if token in self.stop_tokens:
                    done[row] = True
                elif token == self.python_start:
                    expression[row] = []
                elif token == self.python_end and expression[row] is not None:
                    _, result = calculator(self.tokenizer.decode(expression[row]))  # a refusal is shown too
                    forced[row] = [self.output_start] + self.tokenizer.encode_ordinary(result) + [self.output_end]
                    expression[row] = None
                elif expression[row] is not None:
                    expression[row].append(token)
            if all(done):
                return
            logits = model(torch.tensor(tokens, device=device)[:, None], kv_cache=cache)[:, -1, :]

    def generate_batch(self, prompt, num_samples=1, max_tokens=64, temperature=1.0, top_k=None, seed=42,
                       keep_stop_token=False):
        """Return (token lists, sampled masks), one per row, each ending before its stop token
        (or with it, if keep_stop_token: RL trains the model to stop)."""
        results = [[] for _ in range(num_samples)]
        masks = [[] for _ in range(num_samples)]
        finished = [False] * num_samples
        for tokens, sampled in self.generate(prompt, num_samples, max_tokens, temperature, top_k, seed):
            for row, (token, was_sampled) in enumerate(zip(tokens, sampled)):
                if finished[row]:
                    continue
                finished[row] = token in self.stop_tokens
                if finished[row] and not keep_stop_token:
                    continue
                results[row].append(token)
                masks[row].append(int(was_sampled))
        return results, masks


def complete(model, tokenizer, text, max_tokens=48, temperature=0.0, seed=42):
    """Continue a text prompt (after BOS), greedily by default, stopping at BOS."""
    bos = tokenizer.special_tokens["<|bos|>"]
    (tokens,), _ = Engine(model, tokenizer).generate_batch([bos] + tokenizer.encode_ordinary(text), 1, max_tokens, temperature, seed=seed)
    return tokenizer.decode(tokens)


# -----------------------------------------------------------------------------------------------
# Evaluation: bits per byte

@torch.no_grad()
def evaluate_bpb(model, batches, num_batches, token_bytes):
    """Validation loss in bits per byte of text: the summed cross-entropy (nats) of every target
    token, over ln(2) times the bytes those tokens stand for. Unlike plain loss, this does not
    depend on the tokenizer's vocabulary, so models with different tokenizers compare.
    Special tokens (0 bytes) are left out. Sums are all-reduced across ranks."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(num_batches):
        x, y, _ = next(batches)
        loss = model(x, y, loss_reduction="none").view(-1)  # (B*T,) nats
        y = y.reshape(-1)
        nbytes = token_bytes[y.clamp(min=0)] * (y >= 0)
        total_nats += (loss * (nbytes > 0)).sum().double()
        total_bytes += nbytes.sum()
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    return (total_nats / (math.log(2) * total_bytes.clamp(min=1))).item()


@torch.no_grad()
def evaluate_loss(model, batches, num_batches):
    """Mean cross-entropy over the targets that are not ignored (-1), all-reduced across ranks."""
    device = model.cos.device
    total, count = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(num_batches):
        x, y, _ = next(batches)
        total += model(x, y, loss_reduction="sum").double()
        count += (y >= 0).sum()
    if dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count.clamp(min=1)).item()


# -----------------------------------------------------------------------------------------------
# Evaluation: chat tasks (multiple choice, factual questions, word problems with the tool)

def extract_answer(text):
    """The number after the last '####', with thousands separators removed, or None:
    "... so 15 apples.\\n#### 1,015" -> "1015"."""
    matches = re.findall(r"(?<!#)####(?!#)\s*([-+]?[\d, ]*\.?\d+)", text)
    return matches[-1].replace(",", "").replace(" ", "") if matches else None


def answer_is_correct(text, reference):
    """Grade a worked answer against the reference number: "18", "18.0" and "18.00" agree,
    "1,000" equals 1000, and a missing '####' line (or a malformed one like '#####') scores as wrong."""
    got = extract_answer(text)
    if got is None:
        return False
    try:
        return abs(float(got) - float(str(reference).replace(",", "").strip())) < 1e-6
    except ValueError:
        return False


def shard(items, ddp):
    """This rank's share of a list of evaluation items (every world_size-th item)."""
    return items[ddp.rank::ddp.world_size]


def all_reduce_counts(correct, total, device):
    counts = torch.tensor([correct, total], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return counts[0].item(), counts[1].item()


@torch.no_grad()
def evaluate_multiple_choice(model, tokenizer, items, ddp):
    """Accuracy on MMLU-style items: the model reads the question and the lettered choices, and
    its answer is whichever choice letter gets the highest logit as the first assistant token
    (no sampling, so small models are measured fairly). Chance is 1 / number of choices."""
    correct = 0
    mine = shard(items, ddp)
    for item in mine:
        ids = render_for_completion(tokenizer, multiple_choice_conversation(item["question"], item["choices"]))
        logits = model(torch.tensor([ids], device=ddp.device))[0, -1]  # (vocab,)
        letters = [tokenizer.encode_ordinary(LETTERS[i])[0] for i in range(len(item["choices"]))]
        correct += int(logits[letters].argmax().item() == item["answer"])
    correct, total = all_reduce_counts(correct, len(mine), ddp.device)
    return correct / max(total, 1)


def evaluate_generative(model, tokenizer, items, ddp, task, max_tokens=96):
    """Accuracy of greedy answers: factual questions count as right when the reply contains the
    answer; word problems when the '####' number is right (the calculator tool is available)."""
    engine, correct = Engine(model, tokenizer), 0
    mine = shard(items, ddp)
    for item in mine:
        prompt = render_for_completion(tokenizer, dict(messages=[dict(role="user", content=item["question"])]))
        (tokens,), _ = engine.generate_batch(prompt, 1, max_tokens, temperature=0.0)
        reply = tokenizer.decode(tokens)
        if task == "word_problem":
            correct += answer_is_correct(reply, item["answer"])
        else:
            correct += item["answer"].lower() in reply.lower()
    correct, total = all_reduce_counts(correct, len(mine), ddp.device)
    return correct / max(total, 1)


def evaluate_chat(model, tokenizer, ddp, n=200):
    """The TinyWorld chat report card on held-out (test split) items: accuracy per task."""
    model.eval()
    results = dict(
        multiple_choice=evaluate_multiple_choice(model, tokenizer, tinyworld_eval_items("multiple_choice", n=n), ddp),
        fact=evaluate_generative(model, tokenizer, tinyworld_eval_items("fact", n=n), ddp, "fact"),
        word_problem=evaluate_generative(model, tokenizer, tinyworld_eval_items("word_problem", n=n), ddp, "word_problem"),
    )
    return results


# -----------------------------------------------------------------------------------------------
# Evaluation: CORE (DCLM) for base models; real chat tasks and ChatCORE for chat models
#
# CORE is the score the DCLM paper gives a base model: in-context learning on 22 public tasks,
# read from an "eval bundle" of jsonl files. Nothing is sampled; every item is decided by the
# model's per-token loss on candidate texts, in one of three ways:
# - multiple_choice: one question, several answers; the model picks the answer whose tokens
#   have the lowest mean loss after the question.
# - schema: several contexts, one shared continuation; the model picks the context after which
#   the continuation has the lowest mean loss.
# - language_modeling: one context and its continuation; right only if greedy prediction
#   reproduces every token of the continuation.
# A task's accuracy is centered on its random baseline, (acc - baseline) / (1 - baseline), so
# chance scores 0 and perfection 1 on every task alike; CORE is the mean over the tasks.

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def core_texts(item, task_type, delimiter, fewshot=()):
    """The texts one CORE item is scored on, after its few-shot examples (each solved and
    followed by a blank line). With delimiter " " and no shots:
        multiple_choice   {"query": "Sky is", "choices": ["blue", "red"], "gold": 0} -> ["Sky is blue", "Sky is red"]
        schema            {"context_options": ["A cat", "A fish"], "continuation": "purrs", "gold": 0}
                          -> ["A cat purrs", "A fish purrs"]
        language_modeling {"context": "One, two,", "continuation": "three"} -> ["One, two,", "One, two, three"]
    (the first text of language_modeling marks where the continuation starts; it is stripped,
    since a trailing space would belong to the continuation's first token)."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    if task_type == "language_modeling":
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        prompt = f"{shots}{item['context'].strip()}{delimiter}"
        return [prompt.strip(), prompt + item["continuation"]]
    raise UserError(f"unknown CORE task type {task_type!r} (expected multiple_choice, schema or language_modeling)")


def common_prefix_length(sequences):
    """[[1, 2, 3], [1, 2, 4, 5]] -> 2"""
    n = 0
    for column in zip(*sequences):
        if any(token != column[0] for token in column):
            break
        n += 1
    return n


def core_spans(tokenizer, texts, task_type):
    """Token rows (BOS first) to forward, and in each the [start, end) span whose loss decides.
    The texts are tokenized whole, as the model reads them; the span is what differs between the
    rows: the answers after the common prefix (multiple_choice), the shared continuation, i.e. the
    common suffix (schema), or what the second text adds to the first (language_modeling, whose
    first row is only that marker and is not forwarded). Every span keeps at least one token."""
    bos = tokenizer.special_tokens["<|bos|>"]
    rows = [[bos] + tokenizer.encode_ordinary(text) for text in texts]
    if task_type == "schema":
        n = min(common_prefix_length([row[::-1] for row in rows]), min(len(row) for row in rows) - 1)
        return rows, [(len(row) - n, len(row)) for row in rows]
    start = common_prefix_length(rows)
    if task_type == "language_modeling":
        rows = rows[1:]
    start = min(start, min(len(row) for row in rows) - 1)
    return rows, [(start, len(row)) for row in rows]


def core_fewshot(data, index, num_fewshot):
    """num_fewshot examples for item `index`, drawn with a fixed seed per item, never the item itself."""
    others = [i for i in range(len(data)) if i != index]
    rng = random.Random(1234 + index)
    return [data[i] for i in rng.sample(others, min(num_fewshot, len(others)))]


@torch.no_grad()
def score_core_item(model, tokenizer, task, data, index, device):
    """True when the model gets CORE item data[index] right (see the section comment)."""
    item = data[index]
    texts = core_texts(item, task["type"], task["delimiter"], core_fewshot(data, index, task["num_fewshot"]))
    rows, spans = core_spans(tokenizer, texts, task["type"])
    # longer than the model's context: drop tokens from the left (the oldest few-shot text first)
    T = model.config.sequence_len
    crops = [max(0, len(row) - T) for row in rows]
    rows = [row[crop:] for row, crop in zip(rows, crops)]
    spans = [(max(1, start - crop), end - crop) for (start, end), crop in zip(spans, crops)]
    # all the candidates of one item in one forward, padded on the right with BOS (never scored)
    ids = torch.full((len(rows), max(len(row) for row in rows)), tokenizer.special_tokens["<|bos|>"],
                     dtype=torch.long, device=device)  # (N, L)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, device=device)
    logits = model(ids)  # (N, L, vocab); position t predicts token t+1
    if task["type"] == "language_modeling":
        (start, end), = spans
        return torch.equal(logits[0, start - 1:end - 1].argmax(dim=-1), ids[0, start:end])
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (N, L-1)
    mean_losses = torch.stack([losses[i, start - 1:end - 1].mean() for i, (start, end) in enumerate(spans)])
    return mean_losses.argmin().item() == item["gold"]


def evaluate_core_task(model, tokenizer, task, data, ddp):
    """(correct, total) on one CORE task, summed over ranks: each rank scores every
    world_size-th item, with the whole task at hand for drawing few-shot examples."""
    mine = shard(list(range(len(data))), ddp)
    correct = sum(score_core_item(model, tokenizer, task, data, index, ddp.device) for index in mine)
    return all_reduce_counts(correct, len(mine), ddp.device)


def centered_accuracy(accuracy, baseline):
    """0 at chance, 1 when perfect: centered_accuracy(0.625, 0.25) -> 0.5"""
    return (accuracy - baseline) / (1 - baseline)


def load_core_bundle(directory, max_per_task=-1):
    """The tasks of a DCLM eval bundle, as dicts (label, type, num_fewshot, delimiter,
    random_baseline as a fraction, items). The bundle's layout:
        core.yaml              icl_tasks: [{label, dataset_uri, num_fewshot: [n], icl_task_type,
                               continuation_delimiter (default " ")}, ...]
        eval_meta_data.csv     one row per task: "Eval Task", "Random baseline" (in percent), ...
        eval_data/<dataset_uri> one item per line (fields by type: see core_texts)
    Items are shuffled with a fixed seed, since some files are sorted, then cut to max_per_task."""
    import csv
    import yaml  # PyYAML comes with `datasets`
    directory = Path(directory)
    try:
        config = yaml.safe_load((directory / "core.yaml").read_text(encoding="utf-8"))
        with open(directory / "eval_meta_data.csv", newline="", encoding="utf-8") as f:
            baselines = {row["Eval Task"]: row["Random baseline"] for row in csv.DictReader(f)}  # percent, as text
        tasks = []
        for spec in config["icl_tasks"]:
            shots = spec.get("num_fewshot", 0)
            lines = (directory / "eval_data" / spec["dataset_uri"]).read_text(encoding="utf-8").splitlines()
            items = [json.loads(line) for line in lines if line.strip()]
            random.Random(1337).shuffle(items)
            tasks.append(dict(label=spec["label"], type=spec["icl_task_type"],
                              num_fewshot=shots[0] if isinstance(shots, list) else shots,
                              delimiter=spec.get("continuation_delimiter", " "),
                              random_baseline=float(baselines[spec["label"]]) / 100,
                              items=items[:max_per_task] if max_per_task > 0 else items))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"the CORE bundle in {directory} is incomplete or malformed ({type(e).__name__}: {e}); "
                        f"expected core.yaml, eval_meta_data.csv and eval_data/ as in {EVAL_BUNDLE_URL}") from None
    return tasks


def evaluate_core(model, tokenizer, bundle_dir, ddp, max_per_task=-1):
    """CORE of a base model on the bundle in bundle_dir; prints one line per task."""
    tasks = load_core_bundle(bundle_dir, max_per_task)
    print0(f"CORE on {len(tasks)} tasks from {bundle_dir}:")
    print0(f"  {'task':34s} {'type':17s} {'shots':>5s} {'items':>6s} {'accuracy':>9s} {'centered':>9s}")
    table = {}
    for task in tasks:
        correct, total = evaluate_core_task(model, tokenizer, task, task["items"], ddp)
        accuracy = correct / max(total, 1)
        centered = centered_accuracy(accuracy, task["random_baseline"])
        table[task["label"]] = dict(type=task["type"], shots=task["num_fewshot"], items=total,
                                    accuracy=accuracy, centered=centered)
        print0(f"  {task['label']:34s} {task['type']:17s} {task['num_fewshot']:5d} {total:6d} {accuracy:9.4f} {centered:9.4f}")
    core = sum(row["centered"] for row in table.values()) / max(len(table), 1)
    print0(f"  {'CORE (mean centered accuracy)':34s} {'':17s} {'':5s} {'':6s} {'':9s} {core:9.4f}")
    return dict(CORE=core, core_tasks=table)


def download_eval_bundle(directory, url=EVAL_BUNDLE_URL, attempts=5, first_wait_s=1.0):
    """Download the zipped bundle and unpack it as `directory`, retrying failed requests after
    1, 2, 4, 8 s. The archive is written under a temporary name and unpacked into a temporary
    folder that is renamed into place when complete, so an interrupted run leaves no half bundle.
    The archive's sha256 is kept in <directory>/SOURCE for the record (there is no published one)."""
    import hashlib
    import shutil
    import tempfile
    import urllib.request
    import zipfile
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    archive = directory.with_name(f".{directory.name}.zip.tmp{os.getpid()}")
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
            break
        except OSError as e:
            archive.unlink(missing_ok=True)
            reason = getattr(e, "reason", None) or e
            if attempt == attempts - 1:
                raise UserError(f"could not download {url} after {attempts} attempts ({reason})") from None
            print0(f"download of the eval bundle failed ({reason}); retrying in {first_wait_s * 2 ** attempt:.0f}s")
            time.sleep(first_wait_s * 2 ** attempt)
    try:
        sha256 = hashlib.sha256()
        with open(archive, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha256.update(block)
        with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
            found = next(Path(tmp).rglob("core.yaml"), None)
            if found is None:
                raise UserError(f"{url} holds no core.yaml: not an eval bundle")
            (found.parent / "SOURCE").write_text(f"{url}\nsha256 {sha256.hexdigest()}\n")
            os.replace(found.parent, directory)
    except zipfile.BadZipFile:
        raise UserError(f"{url} did not give a valid zip archive") from None
    finally:
        archive.unlink(missing_ok=True)
    print0(f"downloaded the eval bundle into {directory} (sha256 {sha256.hexdigest()})")


def find_core_bundle(args, ddp):
    """The CORE bundle folder: --core-bundle, else <base_dir>/eval_bundle, downloaded there with
    --data hf. Returns None after saying, in one line, what is missing and how to supply it."""
    if args.core_bundle:
        if not (Path(args.core_bundle) / "core.yaml").exists():
            raise UserError(f"--core-bundle {args.core_bundle} has no core.yaml: pass the folder that holds "
                            "core.yaml, eval_meta_data.csv and eval_data/")
        return Path(args.core_bundle)
    directory = base_dir() / "eval_bundle"
    if not (directory / "core.yaml").exists() and args.data == "hf":
        if ddp.is_master:
            try:
                download_eval_bundle(directory)
            except UserError as e:
                print0(f"CORE skipped: {e}; download it by hand, unzip it and pass --core-bundle DIR")
        if ddp.is_ddp:
            dist.barrier()
        return directory if (directory / "core.yaml").exists() else None
    if not (directory / "core.yaml").exists():
        print0(f"CORE skipped: no eval bundle in {directory}; pass --core-bundle DIR (a folder with core.yaml, "
               f"eval_meta_data.csv, eval_data/, unzipped from {EVAL_BUNDLE_URL}), or use --data hf to download it")
        return None
    return directory


# The chat model's report card on real data (nanochat's choice of tasks): ARC-Easy,
# ARC-Challenge and MMLU as multiple choice, read off the letter logits; GSM8K generated
# greedily with the calculator tool; HumanEval, when asked for, generated and run in a sandbox.
# ChatCORE is, like CORE, the mean centered accuracy, here over the tasks that ran.

CHAT_EVAL_TASKS = {  # task -> (folder under --data-dir, hub path, hub config, chance accuracy)
    "ARC-Easy": ("arc_easy", "allenai/ai2_arc", "ARC-Easy", 0.25),
    "ARC-Challenge": ("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", 0.25),
    "MMLU": ("mmlu", "cais/mmlu", "all", 0.25),
    "GSM8K": ("gsm8k", "openai/gsm8k", "main", 0.0),
    "HumanEval": ("humaneval", "openai/openai_humaneval", None, 0.0),
}


def load_eval_dataset(task, data_dir):
    """A task's test split: test*.parquet or test*.jsonl in <data-dir>/<folder>/, else the hub."""
    import datasets  # heavy; only imported for real data
    folder, path, config, _ = CHAT_EVAL_TASKS[task]
    local = Path(data_dir or ".") / folder
    files = sorted(local.glob("test*.parquet")) + sorted(local.glob("test*.jsonl")) if local.is_dir() else []
    if files:
        kind = "parquet" if files[0].suffix == ".parquet" else "json"
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    try:
        return datasets.load_dataset(path, config, split="test")
    except Exception as e:
        raise UserError(f"could not load {path} ({config or 'default'}, test) from the hub ({type(e).__name__}); "
                        f"for offline use put test*.parquet or test*.jsonl files in {local}/") from None


def chat_eval_item(task, row):
    """One dataset row in the item format of the evaluators above. ARC names its answer by a
    label ("B", or "2" in a few rows), MMLU by an index, GSM8K by the number after '####'."""
    if task.startswith("ARC"):
        labels = list(row["choices"]["label"])
        return dict(question=row["question"], choices=row["choices"]["text"], answer=labels.index(row["answerKey"]))
    if task == "MMLU":
        return dict(question=row["question"], choices=row["choices"], answer=row["answer"])
    if task == "GSM8K":
        return dict(question=row["question"], answer=extract_answer(row["answer"]))
    return dict(prompt=row["prompt"], test=row["test"], entry_point=row["entry_point"])


# HumanEval runs code that a model wrote, so it runs in a sandbox: bubblewrap (bwrap, the sandbox
# tool under Flatpak, packaged by every major distribution) builds it from Linux namespaces, and a
# seccomp filter closes what the namespaces leave open. What the sandbox shows, read-only, besides
# the Python installation: the system's programs and libraries. Home folders, /etc, /tmp, /var, the
# data and the checkpoints are absent, whatever their permissions.
SANDBOX_READ_ONLY = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")

SANDBOX_DENIED_CALLS = {  # system call -> its number on x86_64, on aarch64 (which has no fork or vfork)
    "clone": (56, 220), "clone3": (435, 435), "fork": (57, None), "vfork": (58, None),  # processes, threads
    "unshare": (272, 97),  # a nested user namespace would let it mount a memory file system of its own
    "shmget": (29, 194), "msgget": (68, 186), "semget": (64, 190),  # System V IPC: memory outside RLIMIT_AS
    "io_uring_setup": (425, 425), "bpf": (321, 280),  # kernel worker threads; kernel-memory maps
}


def sandbox_seccomp_filter():
    """The seccomp filter of the sandbox, as bwrap --seccomp reads it: a classic BPF program that the
    kernel runs on every system call of the sandboxed process. It makes the calls in
    SANDBOX_DENIED_CALLS, calls of another architecture (x86_64's x32 calls, numbered from
    0x40000000, and 32-bit ones) fail with EPERM, and lets the rest through. So the program stays
    one process with one thread, a limit that RLIMIT_NPROC cannot set: the kernel does not apply it
    to root. Each instruction is (operation, jump if true, jump if false, operand); a jump skips
    that many instructions."""
    import errno
    import platform
    import struct
    audit_arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(platform.machine())
    if audit_arch is None:
        raise OSError(f"the sandbox's seccomp filter knows x86_64 and aarch64, not {platform.machine()}")
    column = 1 if platform.machine() == "aarch64" else 0
    numbers = [pair[column] for pair in SANDBOX_DENIED_CALLS.values() if pair[column] is not None]
    LOAD, JUMP_IF_EQUAL, JUMP_IF_AT_LEAST, RETURN = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, ...
    ALLOW, DENY = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
    program = [(LOAD, 0, 0, 4),  # the call's architecture (struct seccomp_data: nr at 0, arch at 4)
               (JUMP_IF_EQUAL, 1, 0, audit_arch),  # ours: skip the DENY below
               (RETURN, 0, 0, DENY),
               (LOAD, 0, 0, 0)]  # the call's number
    checks = [(JUMP_IF_AT_LEAST, 0x40000000)] + [(JUMP_IF_EQUAL, number) for number in numbers]
    program += [(operation, len(checks) - i, 0, value) for i, (operation, value) in enumerate(checks)]  # to DENY
    program += [(RETURN, 0, 0, ALLOW), (RETURN, 0, 0, DENY)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def run_sandboxed(program, timeout_s=10.0, memory_bytes=1 << 30, error_file=None):
    """Run untrusted Python code; True when it exits with status 0 in time.

    The code runs under bwrap with the interpreter of the Python that runs this file (`python -I`,
    its standard library, an empty environment) and gets
      - files: SANDBOX_READ_ONLY and the Python installation (sys.base_prefix), read-only; nothing
        else exists, and nothing is writable (the code arrives on standard input);
      - processes: only itself, as PID 1 of a new PID namespace, with no capabilities; the seccomp
        filter above refuses it any new process or thread;
      - no network (a new network namespace: not even the host's localhost), IPC or host name;
      - limits on address space, CPU seconds, file size (what it may write to a file it was given,
        such as error_file) and open files.
    Without bwrap the code is not run and this raises; when bwrap cannot build the sandbox it runs
    nothing and this returns False (sandbox_problem() says why). At the timeout, or if this process
    dies, bwrap is killed and takes the sandbox with it (--die-with-parent).
    error_file: a file that receives bwrap's and the code's error output (default: discarded)."""
    import resource
    import shutil
    import signal
    import subprocess
    import tempfile
    if sys.platform != "linux":
        raise OSError("the sandbox needs Linux (namespaces and seccomp, through bubblewrap)")
    bwrap = shutil.which("bwrap")
    if not bwrap:
        raise OSError("bubblewrap is not installed (Debian/Ubuntu: sudo apt-get install bubblewrap; "
                      "Fedora: sudo dnf install bubblewrap; Arch: sudo pacman -S bubblewrap)")
    for private in (Path.home(), Path.cwd()):  # e.g. a Python installed in /
        if private.is_relative_to(sys.base_prefix):
            raise OSError(f"the Python installation {sys.base_prefix} holds {private}, which the sandbox would show")
    seccomp_filter = sandbox_seccomp_filter()

    def limit():  # runs in the child between fork and exec; bwrap and the code inherit the limits
        for which, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, math.ceil(timeout_s)),
                             (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))

    with tempfile.TemporaryFile() as code, tempfile.TemporaryFile() as rules:
        code.write(program.encode())
        rules.write(seccomp_filter)
        code.seek(0)
        rules.seek(0)
        command = [bwrap, "--unshare-all", "--unshare-user", "--cap-drop", "ALL",  # as root too: no capabilities
                   "--die-with-parent", "--new-session", "--as-pid-1"]  # setsid: no way to the terminal
        for path in (*SANDBOX_READ_ONLY, sys.base_prefix):
            command += ["--ro-bind-try", path, path]
        command += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/",
                    "--seccomp", str(rules.fileno()), os.path.realpath(sys.executable), "-I", "-"]
        with subprocess.Popen(command, env={}, stdin=code, stdout=subprocess.DEVNULL,
                              stderr=error_file or subprocess.DEVNULL, pass_fds=[rules.fileno()],
                              preexec_fn=limit, start_new_session=True) as process:
            try:
                return process.wait(timeout=timeout_s) == 0
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return False


def sandbox_problem():
    """None when run_sandboxed works on this machine, else one line: what is missing and how to get it."""
    import tempfile
    with tempfile.TemporaryFile() as errors:
        try:
            if run_sandboxed("import os\nassert os.getpid() == 1\n", error_file=errors):
                return None
        except (ImportError, OSError) as e:  # ImportError: no `resource` module (Windows)
            return str(e)
        errors.seek(0)
        lines = errors.read().decode(errors="replace").strip().splitlines() or ["no message"]
    return f"bwrap could not build the sandbox ({lines[-1]}); see the README's note on HumanEval"


def humaneval_program(item, reply):
    """The program that checks one HumanEval answer: the prompt's imports, the model's code (the
    first ``` block if it wrote one; appended to the prompt if it only wrote the function's
    body), the task's tests, and check(<function>)."""
    block = re.search(r"```(?:python)?\n(.*?)```", reply, re.DOTALL)
    code = block.group(1) if block else reply
    if f"def {item['entry_point']}" not in code:
        code = item["prompt"] + code
    imports = "\n".join(line for line in item["prompt"].splitlines() if line.startswith(("import ", "from ")))
    return f"{imports}\n\n{code}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"


def evaluate_humaneval(model, tokenizer, items, ddp, max_tokens=256):
    """pass@1 of greedy answers to HumanEval, each checked by its tests in the sandbox."""
    engine, passed = Engine(model, tokenizer), 0
    mine = shard(items, ddp)
    for item in mine:
        prompt = render_for_completion(tokenizer, dict(messages=[dict(role="user", content=item["prompt"])]))
        (tokens,), _ = engine.generate_batch(prompt, 1, max_tokens, temperature=0.0)
        passed += run_sandboxed(humaneval_program(item, tokenizer.decode(tokens)))
    passed, total = all_reduce_counts(passed, len(mine), ddp.device)
    return passed / max(total, 1)


def evaluate_real_chat(args, model, tokenizer, ddp):
    """Accuracy on each real chat task that can run here, and ChatCORE over them; a task whose
    data cannot be loaded is skipped with one line saying how to supply it."""
    tasks = {}
    for task, (_, _, _, chance) in CHAT_EVAL_TASKS.items():
        if task == "HumanEval":
            problem = sandbox_problem() if args.humaneval else None
            if not args.humaneval or problem:
                print0("HumanEval skipped: " + (f"no sandbox on this machine ({problem})" if problem else
                       "it runs model-written code; pass --humaneval to run it in a sandbox (bubblewrap)"))
                continue
        try:
            rows = load_eval_dataset(task, args.data_dir)
        except UserError as e:
            print0(f"{task} skipped: {e}")
            continue
        if args.max_per_task > 0:
            rows = rows.select(range(min(args.max_per_task, len(rows))))
        items = [chat_eval_item(task, row) for row in rows]
        if task == "GSM8K":
            accuracy = evaluate_generative(model, tokenizer, items, ddp, "word_problem", args.max_new_tokens)
        elif task == "HumanEval":
            accuracy = evaluate_humaneval(model, tokenizer, items, ddp, args.max_new_tokens)
        else:
            accuracy = evaluate_multiple_choice(model, tokenizer, items, ddp)
        tasks[task] = dict(items=len(items), accuracy=accuracy, centered=centered_accuracy(accuracy, chance))
        print0(f"  {task:14s} N={len(items):<6d} accuracy {accuracy:7.2%}  centered {tasks[task]['centered']:.4f}")
    if not tasks:
        return {}
    chatcore = sum(row["centered"] for row in tasks.values()) / len(tasks)
    print0(f"  ChatCORE (mean centered accuracy over {len(tasks)} tasks) {chatcore:.4f}")
    return dict(chat_tasks=tasks, ChatCORE=chatcore)


def real_eval_report_lines(reports):
    """report.md sections for CORE (eval_base) and the real chat tasks with ChatCORE (eval_mid,
    eval_sft, eval_rl), from the reports `--stage eval` writes."""
    lines = []
    core = reports.get("eval_base", {})
    if "CORE" in core:
        lines += ["", "## CORE of the base model (DCLM tasks, centered accuracy)", "",
                  f"CORE = {core['CORE']:.4f}, the mean centered accuracy over {len(core['core_tasks'])} tasks.", "",
                  "| task | type | shots | items | accuracy | centered |", "|---|---|---|---|---|---|"]
        lines += [f"| {label} | {r['type']} | {r['shots']} | {r['items']} | {r['accuracy']:.4f} | {r['centered']:.4f} |"
                  for label, r in core["core_tasks"].items()]
    stages = [(stage, reports[f"eval_{stage}"]) for stage in ("mid", "sft", "rl")
              if reports.get(f"eval_{stage}", {}).get("chat_tasks")]
    if stages:
        names = [task for task in CHAT_EVAL_TASKS if any(task in r["chat_tasks"] for _, r in stages)]
        lines += ["", "## Chat evaluations (real tasks; ChatCORE = mean centered accuracy over the tasks run)", "",
                  "| after stage | " + " | ".join(names) + " | ChatCORE |", "|---|" + "---|" * (len(names) + 1)]
        for stage, r in stages:
            cells = [f"{r['chat_tasks'][t]['accuracy']:.1%}" if t in r["chat_tasks"] else "-" for t in names]
            lines.append(f"| {stage} | " + " | ".join(cells) + f" | {r['ChatCORE']:.4f} |")
    return lines


# -----------------------------------------------------------------------------------------------
# Checkpoints: <base_dir>/checkpoints/<stage>/<tag>/{model,optim}_<step>.pt and meta_<step>.json
#
# Each file is written to a temporary name and renamed into place; the metadata goes last and
# marks the checkpoint complete. Older checkpoints are removed only after a new one is complete,
# so a crash or Ctrl-C at any moment leaves the last good checkpoint loadable.

def checkpoint_dir(stage, tag):
    return base_dir() / "checkpoints" / stage / tag


def atomic_write(path, write):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(directory, step, model, optimizers, meta):
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / f"model_{step:06d}.pt", lambda p: torch.save(model.state_dict(), p))
    if optimizers is not None:
        atomic_write(directory / f"optim_{step:06d}.pt", lambda p: torch.save([o.state_dict() for o in optimizers], p))
    atomic_write(directory / f"meta_{step:06d}.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    for old in directory.glob("*_*.*"):
        if old.stem.rsplit("_", 1)[-1] != f"{step:06d}":
            old.unlink(missing_ok=True)


def last_checkpoint_step(directory):
    steps = [int(p.stem.split("_")[1]) for p in directory.glob("meta_*.json")]
    steps = [s for s in steps if (directory / f"model_{s:06d}.pt").exists()]
    return max(steps) if steps else None


def torch_load(path, device):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint file {path} (truncated or corrupt: {type(e).__name__}); "
                        "delete that checkpoint directory and run the stage again") from None


def load_checkpoint(stage, tag, device, with_optimizer=False, hint=""):
    """Return (model, optimizer state dicts or None, meta) of the last checkpoint of a stage."""
    directory = checkpoint_dir(stage, tag)
    step = last_checkpoint_step(directory) if directory.exists() else None
    if step is None:
        raise UserError(f"no {stage} checkpoint in {directory}" + (f": {hint}" if hint else ""))
    try:
        meta = json.loads((directory / f"meta_{step:06d}.json").read_text())
        config = GPTConfig(**meta["model_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint metadata {directory}/meta_{step:06d}.json is unreadable ({e})") from None
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills the rotary buffers; the weights are replaced just below
    state = torch_load(directory / f"model_{step:06d}.pt", device)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint {directory} does not match its metadata's model config: {str(e).splitlines()[0]}") from None
    optim_states = torch_load(directory / f"optim_{step:06d}.pt", device) if with_optimizer else None
    return model, optim_states, meta


def check_tokenizer(meta, tokenizer, where):
    if meta.get("tokenizer") != tokenizer_id(tokenizer):
        raise UserError(f"{where} was trained with tokenizer {meta.get('tokenizer')}, but the current one is "
                        f"{tokenizer_id(tokenizer)}: retrain the stages after --stage tok, or restore that tokenizer")


# -----------------------------------------------------------------------------------------------
# Reports: each stage writes <base_dir>/report/<stage>.json; `--stage report` makes report.md

def write_report(stage, data):
    directory = base_dir() / "report"
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / f"{stage}.json", lambda p: p.write_text(json.dumps(data, indent=2)))


def record_wall_time(stage, seconds):
    """Keep each stage's last wall time in report/wall.json, for the report's timing table."""
    path = base_dir() / "report" / "wall.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = round(seconds, 1)
    write_report("wall", times)


GPU_PEAK_BF16_FLOPS = {  # dense bf16 tensor-core peaks by device name
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def peak_flops(device):
    """Peak bf16 FLOP/s of this GPU by name, or None (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


# -----------------------------------------------------------------------------------------------
# Stage tok: train the tokenizer

def stage_tok(args, ddp):
    prepare_base_data(args, ddp)
    if ddp.is_master:
        t0 = time.time()
        texts, n_chars = [], 0
        for _, text in document_stream(args, "train"):
            texts.append(text)
            n_chars += len(text)
            if n_chars >= args.tok_chars:
                break
        print0(f"training a {args.vocab_size}-token BPE ({bpe.BACKEND} backend) on {n_chars:,} characters "
               f"of {args.data} text...")
        tokenizer = bpe.Tokenizer.train(texts, args.vocab_size, special_tokens=SPECIAL_TOKENS)
        train_seconds = time.time() - t0
        if tokenizer.vocab_size < args.vocab_size:
            print0(f"note: the text ran out of pairs to merge; the vocabulary has {tokenizer.vocab_size} tokens")
        tokenizer_path().parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tokenizer_path())
        val_texts = [text for _, text in itertools.islice(document_stream(args, "val"), 200)]
        n_bytes = sum(len(bpe.text_to_bytes(t)) for t in val_texts)
        n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(val_texts))
        example = "The capital of France is Paris."
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(example)]
        print0(f"saved {tokenizer_path()}: vocab {tokenizer.vocab_size}, {train_seconds:.1f}s, "
               f"{n_bytes / n_tokens:.2f} bytes/token on {len(val_texts)} validation documents")
        print0(f"example: {pieces}")
        write_report("tok", dict(vocab_size=tokenizer.vocab_size, backend=bpe.BACKEND, train_chars=n_chars,
                                 train_seconds=round(train_seconds, 2), val_bytes_per_token=round(n_bytes / n_tokens, 3)))
    if ddp.is_ddp:
        dist.barrier()


# -----------------------------------------------------------------------------------------------
# Training: the loop shared by base, mid and sft

def compile_setting(args):
    return DEVICE_TYPE == "cuda" if args.compile == "auto" else args.compile == "on"


def load_trained(args, ddp, stage, tokenizer):
    """The last checkpoint of `stage` for --model-tag / --depth, checked against the tokenizer:
    (model, meta). Says which stage to run first when there is none."""
    tag = args.model_tag or f"d{args.depth}"
    model, _, meta = load_checkpoint(stage, tag, ddp.device, hint=f"run `python nanochat_one.py --stage {stage}` first "
                                     f"(or pass the --model-tag / --depth it was trained with)")
    check_tokenizer(meta, tokenizer, f"the {stage} checkpoint")
    return model, meta


def start_model(args, ddp, stage, tokenizer, source=None):
    """The model a stage trains, and where it starts:
    --resume: this stage's own last checkpoint, with optimizer state and data position;
    else source=None (base): a fresh model from the depth dial; else the source stage's checkpoint.
    Returns (model, optim_states or None, meta or None)."""
    tag = args.model_tag or f"d{args.depth}"
    if args.resume:
        model, optim_states, meta = load_checkpoint(stage, tag, ddp.device, with_optimizer=True,
                                                    hint="nothing to resume; run without --resume")
        check_tokenizer(meta, tokenizer, f"the {stage} checkpoint")
        return model, optim_states, meta
    if source is None:
        config = config_from_depth(args.depth, tokenizer.vocab_size, args.max_seq_len, args.aspect_ratio,
                                   args.head_dim, args.n_kv_head)
        with torch.device(ddp.device):
            model = GPT(config)
        model.init_weights()
        return model, None, None
    model, _ = load_trained(args, ddp, source, tokenizer)
    return model, None, None


def stage_optimizers(args, model, lr_scale, optim_states=None):
    """setup_optimizers with the CLI's learning rates times lr_scale, restored when resuming."""
    optimizers = setup_optimizers(model, args.matrix_lr * lr_scale, args.embedding_lr * lr_scale,
                                  args.unembedding_lr * lr_scale, args.weight_decay)
    for opt, state in zip(optimizers, optim_states or []):
        opt.load_state_dict(state)
    return optimizers


def wrap_ddp(model, ddp):
    """Under torchrun, DistributedDataParallel averages gradients across ranks during backward."""
    if not ddp.is_ddp:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[ddp.local_rank] if DEVICE_TYPE == "cuda" else None)


def train(args, ddp, stage, model, tokenizer, make_batches, evaluate, num_steps, optim_states=None, meta=None,
          lr_scale=1.0):
    """Train `model` for num_steps optimizer steps of args.total_batch_size tokens.

    make_batches(split, start) yields (inputs, targets, position) micro-batches of
    (device_batch_size, max_seq_len); evaluate(model) returns a dict of validation metrics
    (run every --eval-every steps and at the end). Checkpoints go to
    <base_dir>/checkpoints/<stage>/<tag>. Returns a summary dict for the report."""
    B, T = args.device_batch_size, args.max_seq_len
    config, tag = model.config, args.model_tag or f"d{args.depth}"
    out_dir = checkpoint_dir(stage, tag)
    if config.sequence_len < T:
        raise UserError(f"--max-seq-len {T} is longer than the model's context ({config.sequence_len})")
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.estimate_flops()
    # batch arithmetic: total_batch_size tokens per optimizer step, reached by accumulation
    tokens_per_micro_step = B * T * ddp.world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise UserError(f"--total-batch-size {args.total_batch_size} must be a multiple of device batch x "
                        f"sequence length x processes = {B} x {T} x {ddp.world_size} = {tokens_per_micro_step}")
    grad_accum = args.total_batch_size // tokens_per_micro_step
    print0(f"model: depth {config.n_layer}, width {config.n_embd}, {config.n_head} heads "
           f"({config.n_kv_head} kv), vocab {config.vocab_size}, {num_params:,} parameters, "
           f"{flops_per_token:.3g} FLOPs/token")
    print0(f"{stage}: {num_steps} steps x {args.total_batch_size:,} tokens = {num_steps * args.total_batch_size:,} tokens "
           f"({grad_accum} micro-steps of {B}x{T} on {ddp.world_size} process(es), {DEVICE_TYPE}, {str(COMPUTE_DTYPE)[6:]})")

    optimizers = stage_optimizers(args, model, lr_scale, optim_states)
    start_step, position = 0, -1
    if optim_states is not None:
        start_step, position = meta["step"], meta["data_position"]
        print0(f"resuming from step {start_step} (data position {position})")
        if start_step > num_steps:
            raise UserError(f"the checkpoint is at step {start_step}, past --num-iterations {num_steps}")
    ddp_model = wrap_ddp(model, ddp)
    train_model = torch.compile(ddp_model) if compile_setting(args) else ddp_model
    # resuming skips the documents that were waiting in the packing buffer: a small, harmless gap
    train_batches = make_batches("train", position + 1)
    peak = peak_flops(ddp.device)

    def run_eval(step):
        model.eval()
        result = evaluate(model)
        model.train()
        history.append(dict(step=step, **result))
        print0(f"step {step:5d}/{num_steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    def save(step, metrics):
        if ddp.is_master:
            save_checkpoint(out_dir, step, model, optimizers, dict(
                stage=stage, step=step, num_steps=num_steps, data_position=position, model_config=dataclasses.asdict(config),
                tokenizer=tokenizer_id(tokenizer), args=vars(args), metrics=metrics))

    metrics, history, train_curve, smooth_loss, t_train, tokens_timed = {}, [], [], None, 0.0, 0
    step = start_step
    model.train()
    try:
        while True:
            last = step == num_steps
            if last or (args.eval_every > 0 and step % args.eval_every == 0):
                metrics = run_eval(step)
            if step > start_step and (last or (args.save_every > 0 and step % args.save_every == 0)):
                save(step, metrics)
            if last:
                break
            # one optimizer step: accumulate gradients over micro-steps; DDP all-reduces only on the last
            t0, step_tokens = time.time(), 0
            for micro in range(grad_accum):
                x, y, position = next(train_batches)
                step_tokens += x.numel() * ddp.world_size  # SFT rows are shorter than T: count what ran
                sync = micro == grad_accum - 1 or not ddp.is_ddp
                with contextlib.nullcontext() if sync else ddp_model.no_sync():
                    loss = train_model(x, y) / grad_accum
                    loss.backward()
            lrm = apply_schedules(optimizers, step, num_steps, args)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            train_loss = loss.item() * grad_accum  # .item() waits for the device: the step is done
            dt = time.time() - t0
            step += 1
            if step > start_step + 1:
                t_train += dt  # the first step includes warm-up and compilation
                tokens_timed += step_tokens
            smooth_loss = train_loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * train_loss
            train_curve.append((step, train_loss))
            tok_per_s = step_tokens / dt
            mfu = f" | mfu {100 * flops_per_token * tok_per_s / (peak * ddp.world_size):.1f}%" if peak else ""
            timed_steps = step - start_step - 1
            eta = format_seconds((num_steps - step) * t_train / timed_steps) if timed_steps else "?"
            if step % args.log_every == 0 or step == num_steps:
                print0(f"step {step:5d}/{num_steps} | loss {smooth_loss:.4f} | lr x{lrm:.2f} | {dt * 1000:.0f}ms "
                       f"| {tok_per_s:,.0f} tok/s{mfu} | eta {eta}")
    except KeyboardInterrupt:
        last_saved = last_checkpoint_step(out_dir) if out_dir.exists() else None
        raise UserError(f"interrupted at step {step}; " + (f"the last checkpoint (step {last_saved}) is in {out_dir}: "
                        "continue with --resume" if last_saved else "no checkpoint was written yet")) from None
    # throughput over the timed steps (all but the first, which includes warm-up)
    tok_per_s = tokens_timed / t_train if t_train else 0.0
    return dict(params=num_params, flops_per_token=flops_per_token, steps=num_steps, tokens=num_steps * args.total_batch_size,
                tok_per_s=round(tok_per_s), train_seconds=round(t_train, 1), device=DEVICE_TYPE,
                mfu=round(100 * flops_per_token * tok_per_s / (peak * ddp.world_size), 2) if peak else None,
                metrics=metrics, history=history, train_loss=train_curve)


# -----------------------------------------------------------------------------------------------
# Stage base: pretraining

def stage_base(args, ddp):
    prepare_base_data(args, ddp)
    tokenizer = get_tokenizer()
    model, optim_states, meta = start_model(args, ddp, "base", tokenizer)
    if args.num_iterations > 0:
        num_steps = args.num_iterations
    elif args.target_param_data_ratio is not None:  # Chinchilla-style: training tokens per parameter
        num_params = sum(p.numel() for p in model.parameters())
        num_steps = max(1, round(args.target_param_data_ratio * num_params / args.total_batch_size))
    else:
        num_steps = 400  # the laptop default: a few minutes on a CPU
    B, T = args.device_batch_size, args.max_seq_len
    token_bytes = token_byte_lengths(tokenizer, ddp.device)

    def make_batches(split, start=0):
        return base_batches(args, tokenizer, split, B, T, ddp, ddp.device, start)

    def evaluate(model):
        return dict(val_bpb=evaluate_bpb(model, make_batches("val"), args.eval_batches, token_bytes))

    summary = train(args, ddp, "base", model, tokenizer, make_batches, evaluate, num_steps, optim_states, meta)
    summary["val_bpb"] = round(summary["metrics"]["val_bpb"], 4)
    summary["samples"] = []
    if ddp.is_master:
        model.eval()
        for prompt in args.sample_prompts:
            text = prompt + complete(model, tokenizer, prompt, max_tokens=40)
            summary["samples"].append(text)
            print0(f"sample: {text!r}")
        write_report("base", summary)
    return summary


# -----------------------------------------------------------------------------------------------
# Stages mid and sft: teach the base model to chat
#
# Mid-training continues pretraining on conversations packed like documents, with the loss on
# every token: the model learns the special tokens, the turn structure, multiple choice and
# calling the calculator. This was nanochat's original recipe; upstream later folded it into
# SFT. We keep it as its own stage because it shows a student the two separate jobs: learning
# the chat *format* from lots of packed data (mid), then learning to *answer* with the loss
# only on the assistant's words, one conversation per row (SFT).

def chat_stage(args, ddp, stage, source, make_loader, default_steps, default_lr_scale):
    tokenizer = get_tokenizer()
    model, optim_states, meta = start_model(args, ddp, stage, tokenizer, source=source)
    B, T = args.device_batch_size, args.max_seq_len

    def make_batches(split, start=0):
        return make_loader(args, tokenizer, split, B, T, ddp, ddp.device, start)

    def evaluate(model):
        return dict(val_loss=evaluate_loss(model, make_batches("val"), args.eval_batches))

    num_steps = args.num_iterations if args.num_iterations > 0 else default_steps
    lr_scale = args.lr_scale if args.lr_scale is not None else default_lr_scale
    summary = train(args, ddp, stage, model, tokenizer, make_batches, evaluate, num_steps, optim_states, meta, lr_scale)
    summary["chat_eval"] = {}
    if args.data == "tinyworld":  # real-data chat tasks: --stage eval --data hf
        summary["chat_eval"] = evaluate_chat(model, tokenizer, ddp, n=args.eval_items)
        print0(f"{stage} held-out accuracy (N={args.eval_items} each): "
               + ", ".join(f"{k} {v:.1%}" for k, v in summary["chat_eval"].items()))
    if ddp.is_master:
        write_report(stage, summary)
    return summary


def stage_mid(args, ddp):
    return chat_stage(args, ddp, "mid", "base", mid_batches, default_steps=150, default_lr_scale=1.0)


def stage_sft(args, ddp):
    # a small learning rate: SFT nudges a model that already speaks the format
    return chat_stage(args, ddp, "sft", "mid", sft_batches, default_steps=150, default_lr_scale=0.1)


# -----------------------------------------------------------------------------------------------
# Stage rl: simplified GRPO on problems with checkable answers
#
# Each step: take some problems, sample G answers to each from the current model (tools
# included), reward 1 if the '####' answer is right else 0, and push up the log-probability of
# answers that beat their group's mean reward, down for those below it:
#     advantage_i = reward_i - mean(rewards of the group)
#     loss = -sum over sampled tokens of logp(token) * advantage / number of sampled tokens
# This is GRPO with its machinery removed, and each simplification is acceptable here:
# - no division by the group's reward std: with 0/1 rewards it would only reweight groups, and
#   it inflates groups where one lucky sample differs (a known bias of the original);
# - fully on-policy (one optimizer step per batch of samples), so the importance ratio is 1
#   and PPO-style clipping has nothing to clip;
# - no KL penalty to a reference model: the LR is small and the run short, and dropping it
#   saves a second model in memory;
# - token-level normalisation (divide by all sampled tokens, not per answer), so long answers
#   are not favoured or penalised per token.
# Groups whose rewards are all equal have zero advantage everywhere: they carry no signal and
# are skipped. Tokens forced in by the calculator and the prompt are never trained on.

def pass_at_k(model, tokenizer, problems, ddp, k, max_tokens, temperature, seed=0):
    """Sample k answers per problem; return (pass@1, its standard error, pass@k), where pass@1
    is the mean fraction of correct samples and pass@k the fraction of problems with any correct."""
    engine, fractions = Engine(model, tokenizer), []
    for i, problem in enumerate(shard(problems, ddp)):
        prompt = render_for_completion(tokenizer, word_problem_conversation(problem["question"]))
        answers, _ = engine.generate_batch(prompt, k, max_tokens, temperature, seed=seed + i)
        fractions.append(sum(answer_is_correct(tokenizer.decode(a), problem["answer"]) for a in answers) / k)
    stats = torch.tensor([sum(fractions), sum(f * f for f in fractions), sum(f > 0 for f in fractions), len(fractions)],
                         dtype=torch.float64, device=ddp.device)
    if dist.is_initialized():
        dist.all_reduce(stats)
    total, total_sq, solved, n = stats.tolist()
    mean = total / n
    stderr = math.sqrt(max(total_sq / n - mean * mean, 0.0) / max(n - 1, 1))
    return mean, stderr, solved / n


def grpo_sequences(tokenizer, prompt, answers, sampled_masks, rewards):
    """Turn one group of G sampled answers into training rows: (ids, targets, advantage) with
    targets -1 except on sampled answer tokens. Returns [] when the group carries no signal."""
    mean = sum(rewards) / len(rewards)
    if all(r == rewards[0] for r in rewards):
        return []
    rows = []
    for answer, sampled, reward in zip(answers, sampled_masks, rewards):
        ids = prompt + answer
        targets = [-1] * (len(prompt) - 1) + [t if m else -1 for t, m in zip(answer, sampled)]
        rows.append((ids[:-1], targets, reward - mean))
    return rows


def grpo_loss(model, rows, num_sampled_tokens, device, pad_id):
    """-sum(logp * advantage) / num_sampled_tokens over the rows (right-padded into a batch)."""
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (row_ids, row_targets, _) in enumerate(rows):
        ids[i, :len(row_ids)] = torch.tensor(row_ids)
        targets[i, :len(row_targets)] = torch.tensor(row_targets)
    advantages = torch.tensor([a for _, _, a in rows], dtype=torch.float32, device=device)
    nll = model(ids.to(device), targets.to(device), loss_reduction="none").view(len(rows), width)  # -logp, 0 where ignored
    return (nll * advantages[:, None]).sum() / num_sampled_tokens


def rl_problems(args, rng):
    """(next_problem, held_out): a function drawing training problems {"question", "answer"}
    with rng, and the held-out problems for pass@k. TinyWorld word problems, or GSM8K."""
    if args.data == "tinyworld":
        def next_problem():
            while True:
                problem = tinyworld_word_problem(rng)
                if tinyworld_split(problem["key"]) == "train":
                    return problem

        return next_problem, tinyworld_eval_items("word_problem", "test", n=args.pass_k_problems)
    train, test = load_chat_dataset("gsm8k", "train", args.data_dir), load_chat_dataset("gsm8k", "test", args.data_dir)

    def next_problem():
        row = train[rng.randrange(len(train))]
        return dict(question=row["question"], answer=extract_answer(row["answer"]))

    held_out = test.select(range(min(args.pass_k_problems, len(test))))
    return next_problem, [dict(question=row["question"], answer=extract_answer(row["answer"])) for row in held_out]


def stage_rl(args, ddp):
    tokenizer = get_tokenizer()
    model, optim_states, meta = start_model(args, ddp, "rl", tokenizer, source="sft")
    tag = args.model_tag or f"d{args.depth}"
    out_dir = checkpoint_dir("rl", tag)
    lr_scale = args.lr_scale if args.lr_scale is not None else 0.05
    optimizers = stage_optimizers(args, model, lr_scale, optim_states)
    start_step = meta["step"] if optim_states is not None else 0
    ddp_model = wrap_ddp(model, ddp)
    num_steps, G, P = args.num_iterations if args.num_iterations > 0 else 60, args.num_samples, args.prompts_per_step
    next_problem, held_out = rl_problems(args, random.Random(args.seed + start_step))
    print0(f"rl: {num_steps} steps x {P} problems x {G} samples, temperature {args.temperature}, "
           f"max {args.max_new_tokens} new tokens, lr x{lr_scale}, pass@k on {len(held_out)} held-out problems")
    history, curve = [], []

    def evaluate(step):
        model.eval()
        p1, se, pk = pass_at_k(model, tokenizer, held_out, ddp, G, args.max_new_tokens, args.temperature, seed=10_000)
        history.append(dict(step=step, pass1=p1, pass1_stderr=se, passk=pk))
        print0(f"step {step:4d}/{num_steps} | held-out pass@1 {p1:.3f} +- {se:.3f} | pass@{G} {pk:.3f}")

    engine = Engine(model, tokenizer)
    pad_id = tokenizer.special_tokens["<|bos|>"]
    t_start, t_steps = time.time(), 0.0
    step = start_step
    try:
        while True:
            if step == num_steps or (args.eval_every > 0 and step % args.eval_every == 0) or step == start_step:
                evaluate(step)
            if step > start_step and (step == num_steps or (args.save_every > 0 and step % args.save_every == 0)) and ddp.is_master:
                save_checkpoint(out_dir, step, model, optimizers, dict(
                    stage="rl", step=step, num_steps=num_steps, data_position=step, model_config=dataclasses.asdict(model.config),
                    tokenizer=tokenizer_id(tokenizer), args=vars(args), metrics=history[-1] if history else {}))
            if step == num_steps:
                break
            t0 = time.time()
            # 1) sample G answers for each of this rank's problems with the current policy
            model.eval()
            rows, rewards_all, zero_signal = [], [], 0
            for i in range(P):
                problem = next_problem()
                if i % ddp.world_size != ddp.rank:
                    continue
                prompt = render_for_completion(tokenizer, word_problem_conversation(problem["question"]))
                answers, sampled = engine.generate_batch(prompt, G, args.max_new_tokens, args.temperature,
                                                         seed=hash((args.seed, step, i)) % 2**31, keep_stop_token=True)
                rewards = [float(answer_is_correct(tokenizer.decode(a), problem["answer"])) for a in answers]
                rewards_all += rewards
                group = grpo_sequences(tokenizer, prompt, answers, sampled, rewards)
                zero_signal += not group
                rows += group
            # 2) one policy-gradient step on the groups with signal, normalised by all their sampled tokens
            model.train()
            counts = torch.tensor([sum(t >= 0 for _, targets, _ in rows for t in targets),
                                   (len(rows) + args.device_batch_size - 1) // args.device_batch_size,
                                   sum(rewards_all), len(rewards_all), zero_signal], dtype=torch.float64, device=ddp.device)
            if dist.is_initialized():
                micro_steps = counts[1:2].clone()
                dist.all_reduce(counts)
                dist.all_reduce(micro_steps, op=dist.ReduceOp.MAX)
                counts[1] = micro_steps[0]
            num_tokens, micro_steps, reward_sum, num_samples, zero_groups = counts.tolist()
            chunks = [rows[j:j + args.device_batch_size] for j in range(0, len(rows), args.device_batch_size)]
            for j in range(int(micro_steps)):  # every rank runs the same number of micro-steps (DDP)
                sync = j == int(micro_steps) - 1 or not ddp.is_ddp
                with contextlib.nullcontext() if sync else ddp_model.no_sync():
                    if j < len(chunks):
                        loss = grpo_loss(ddp_model, chunks[j], num_tokens, ddp.device, pad_id)
                    else:  # no rows left on this rank: a zero loss that still joins the all-reduce
                        loss = ddp_model(torch.tensor([[pad_id]], device=ddp.device)).sum() * 0.0
                    loss.backward()
            if micro_steps > 0:
                lrm = 1.0 - step / num_steps  # linear decay to zero
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] = group["initial_lr"] * lrm
                    opt.step()
            model.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - t0
            t_steps += dt
            mean_reward = reward_sum / max(num_samples, 1)
            curve.append(dict(step=step, mean_reward=mean_reward, zero_signal=zero_groups / P, sampled_tokens=int(num_tokens)))
            eta = format_seconds((num_steps - step) * t_steps / (step - start_step))
            print0(f"step {step:4d}/{num_steps} | reward {mean_reward:.3f} | zero-signal groups {zero_groups / P:.2f} "
                   f"| trained tokens {int(num_tokens)} | {dt:.1f}s | eta {eta} (+ evaluations)")
    except KeyboardInterrupt:
        raise UserError(f"interrupted at step {step}; the last rl checkpoint is in {out_dir}: continue with --resume") from None
    summary = dict(history=history, reward_curve=curve, steps=num_steps, num_samples=G, prompts_per_step=P,
                   held_out=len(held_out), train_seconds=round(time.time() - t_start, 1),
                   chat_eval=evaluate_chat(model, tokenizer, ddp, n=args.eval_items) if args.data == "tinyworld" else {})
    if ddp.is_master:
        write_report("rl", summary)
        plot_reward_curve(summary, base_dir() / "report" / "rl.png")
    return summary


def plot_reward_curve(summary, path):
    """Mean reward per step and held-out pass@1 / pass@k, as a PNG (when matplotlib is installed)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: the caller's plotting backend stays as it was
    except ImportError:
        return
    fig = Figure(figsize=(6, 3.5), dpi=80)
    ax = fig.add_subplot()
    ax.plot([c["step"] for c in summary["reward_curve"]], [c["mean_reward"] for c in summary["reward_curve"]],
            alpha=0.5, label="train mean reward")
    steps = [h["step"] for h in summary["history"]]
    ax.errorbar(steps, [h["pass1"] for h in summary["history"]], yerr=[2 * h["pass1_stderr"] for h in summary["history"]],
                marker="o", capsize=3, label="held-out pass@1 (+-2 s.e.)")
    ax.plot(steps, [h["passk"] for h in summary["history"]], marker="s", label=f"held-out pass@{summary['num_samples']}")
    ax.set_xlabel("RL step")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


# -----------------------------------------------------------------------------------------------
# Stages eval and chat: use any checkpoint

def stage_eval(args, ddp):
    tokenizer = get_tokenizer()
    tag = args.model_tag or f"d{args.depth}"
    model, meta = load_trained(args, ddp, args.source, tokenizer)
    model.eval()
    results = {}
    if args.source == "base":
        token_bytes = token_byte_lengths(tokenizer, ddp.device)
        batches = base_batches(args, tokenizer, "val", args.device_batch_size, args.max_seq_len, ddp, ddp.device)
        results["val_bpb"] = evaluate_bpb(model, batches, args.eval_batches, token_bytes)
        bundle = find_core_bundle(args, ddp)
        real = evaluate_core(model, tokenizer, bundle, ddp, args.max_per_task) if bundle else {}
    elif args.data == "hf":
        real = evaluate_real_chat(args, model, tokenizer, ddp)
    else:
        real = {}
    if args.data == "tinyworld":
        results |= evaluate_chat(model, tokenizer, ddp, n=args.eval_items)
    print0(f"{args.source} checkpoint {tag} (step {meta['step']}), held-out N={args.eval_items} per task:")
    for name, value in results.items():
        print0(f"  {name:16s} {value:.4f}" if name == "val_bpb" else f"  {name:16s} {value:.1%}")
    if ddp.is_master:
        write_report(f"eval_{args.source}", results | real)
    return results | real


def stage_chat(args, ddp):
    """Talk to a checkpoint: `-p "..."` answers once, otherwise an interactive prompt.
    Calculator calls are shown inline as [calculator: 12*7 = 84]."""
    import codecs
    tokenizer = get_tokenizer()
    tag = args.model_tag or f"d{args.depth}"
    model, _ = load_trained(args, ddp, args.source, tokenizer)
    model.eval()
    engine, special = Engine(model, tokenizer), tokenizer.special_tokens
    markers = {special["<|python_start|>"]: "[calculator: ", special["<|python_end|>"]: "",
               special["<|output_start|>"]: " = ", special["<|output_end|>"]: "]"}
    messages = []
    if args.prompt is None:
        print(f"chatting with the {args.source} model {tag}; an empty line or Ctrl-D quits, /clear starts over")
    while True:
        if args.prompt is not None:
            user = args.prompt
        else:
            try:
                user = input("\nuser> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if not user:
                return
            if user == "/clear":
                messages = []
                continue
        messages.append(dict(role="user", content=user))
        prompt = render_for_completion(tokenizer, dict(messages=messages))
        # bytes are decoded incrementally: a character split across tokens is printed once whole
        decoder, reply = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
        print("assistant> " if args.prompt is None else "", end="", flush=True)
        for (token,), _ in engine.generate(prompt, 1, args.max_new_tokens, args.temperature, args.top_k, seed=args.seed):
            if token in engine.stop_tokens:
                break
            reply.append(token)
            text = markers.get(token) if token in markers else decoder.decode(tokenizer.token_to_bytes(token))
            print(text, end="", flush=True)
        print(decoder.decode(b"", final=True))
        messages.append(dict(role="assistant", content=tokenizer.decode(reply)))
        if args.prompt is not None:
            return


# -----------------------------------------------------------------------------------------------
# Stage report: gather every stage's report/<stage>.json into one report.md

def system_info():
    import platform
    import subprocess
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name(0) + f" x{torch.cuda.device_count()}" if torch.cuda.is_available() else "none"
    return dict(cpu=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", gpu=gpu,
                python=platform.python_version(), torch=torch.__version__, commit=commit, bpe_backend=bpe.BACKEND)


def stage_report(args, ddp):
    if not ddp.is_master:
        return
    reports = {path.stem: json.loads(path.read_text()) for path in sorted((base_dir() / "report").glob("*.json"))}
    lines = ["# nanochat-one report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", "", "## System", ""]
    lines += [f"- {k}: {v}" for k, v in system_info().items()]
    if "tok" in reports:
        r = reports["tok"]
        lines += ["", "## Tokenizer", "", f"- vocabulary: {r['vocab_size']} tokens ({r['backend']} backend), trained on "
                  f"{r['train_chars']:,} characters in {r['train_seconds']} s",
                  f"- compression: {r['val_bytes_per_token']} bytes/token on validation text"]
    if "base" in reports:
        r = reports["base"]
        mfu = f"{r['mfu']}%" if r["mfu"] is not None else "n/a (no GPU peak known)"
        lines += ["", "## Base model", "", "| metric | value |", "|---|---|",
                  f"| parameters | {r['params']:,} |", f"| FLOPs per token | {r['flops_per_token']:.3g} |",
                  f"| steps x tokens | {r['steps']} steps, {r['tokens']:,} tokens |",
                  f"| validation bits per byte | {r['val_bpb']} |", f"| throughput | {r['tok_per_s']:,} tok/s ({r['device']}) |",
                  f"| MFU | {mfu} |", f"| training time | {format_seconds(r['train_seconds'])} |", "", "Samples (greedy):", ""]
        lines += [f"- `{sample!r}`" for sample in r["samples"]]
    rows = [(name, reports[key]) for name, key in (("base", "eval_base"), ("mid", "mid"), ("sft", "sft"), ("rl", "rl"))
            if key in reports]
    rows = [(name, r.get("chat_eval", r)) for name, r in rows]
    rows = [(name, r) for name, r in rows if "multiple_choice" in r]
    if rows:
        lines += ["", "## Chat evaluations (held-out TinyWorld items)", "",
                  "| after stage | multiple choice (chance 25%) | factual questions | word problems (with calculator) |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {r['multiple_choice']:.1%} | {r['fact']:.1%} | {r['word_problem']:.1%} |" for name, r in rows]
    lines += real_eval_report_lines(reports)
    if "rl" in reports:
        r = reports["rl"]
        first, last = r["history"][0], r["history"][-1]
        k = r["num_samples"]
        lines += ["", "## RL (GRPO) on word problems", "",
                  f"{r['steps']} steps x {r['prompts_per_step']} problems x {k} samples; pass@k on {r['held_out']} held-out problems "
                  f"(sampled at the RL temperature; +- one standard error).", "",
                  f"| | pass@1 | pass@{k} |", "|---|---|---|",
                  f"| before (step {first['step']}) | {first['pass1']:.3f} +- {first['pass1_stderr']:.3f} | {first['passk']:.3f} |",
                  f"| after (step {last['step']}) | {last['pass1']:.3f} +- {last['pass1_stderr']:.3f} | {last['passk']:.3f} |"]
        curve = r["reward_curve"]
        blocks = [curve[i:i + 10] for i in range(0, len(curve), 10)]
        lines += ["", "Mean training reward per 10 steps: " + ", ".join(
            f"{sum(c['mean_reward'] for c in b) / len(b):.2f}" for b in blocks) + "."]
        if (base_dir() / "report" / "rl.png").exists():
            lines += ["", f"Reward curve: {base_dir() / 'report' / 'rl.png'}"]
    final = next((stage for stage in ("rl", "sft") if stage in reports), None)
    if final is not None:
        tokenizer = get_tokenizer()
        model, _ = load_trained(args, ddp, final, tokenizer)
        model.eval()
        engine = Engine(model, tokenizer)
        lines += ["", f"## Sample conversations (the {final} model, greedy)", ""]
        for question in ("What is the capital of Japan?", tinyworld_eval_items("word_problem", n=1)[0]["question"]):
            prompt = render_for_completion(tokenizer, dict(messages=[dict(role="user", content=question)]))
            (reply,), _ = engine.generate_batch(prompt, 1, 128, temperature=0.0)
            lines += [f"**user:** {question}", "", "**assistant:**", "", "```", tokenizer.decode(reply), "```", ""]
    lines += ["", "## Wall clock", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in reports.get("wall", {}).items()]
    if args.wall_seconds is not None:
        lines.append(f"| whole run (setup included) | {args.wall_seconds} |")
    Path(args.report_path).write_text("\n".join(lines) + "\n")
    print0("\n".join(lines))
    print0(f"wrote {args.report_path}")


# -----------------------------------------------------------------------------------------------
# CLI

STAGES = {"tok": stage_tok, "base": stage_base, "mid": stage_mid, "sft": stage_sft, "rl": stage_rl, "eval": stage_eval,
          "chat": stage_chat, "report": stage_report}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where the default (None) means "decided per stage"."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(
        description="nanochat-one: train and talk to a ChatGPT-style model, one stage at a time. "
                    "Flags are grouped by the stages that read them.",
        formatter_class=HelpFormatter)
    p.add_argument("--stage", required=True, choices=list(STAGES), help="which stage to run")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="tinyworld", choices=["tinyworld", "hf"],
                   help="tinyworld: the embedded synthetic world (offline); hf: real datasets (FineWeb-EDU, SmolTalk, MMLU, GSM8K)")
    g.add_argument("--data-dir", default=None, help="--data hf: folder of FineWeb-EDU style parquet shards (a text column) and "
                   "of smoltalk/, mmlu/, gsm8k/ subfolders (default: <base_dir>/base_data, downloaded there; chat data from the hub)")
    g.add_argument("--num-shards", type=int, default=8, help="--data hf without --data-dir: FineWeb-EDU shards to download "
                   "(about 100 MB each): the first N-1 for training, plus the pinned validation shard")
    g = p.add_argument_group("tokenizer (tok)")
    g.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (256 bytes + merges + special tokens)")
    g.add_argument("--tok-chars", type=int, default=2_000_000, help="characters of training text")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=4, help="number of transformer blocks; the width follows from it")
    g.add_argument("--aspect-ratio", type=int, default=32, help="width = depth x aspect ratio, rounded up to whole heads (nanochat: 64)")
    g.add_argument("--head-dim", type=int, default=32, help="dimension of each attention head (nanochat: 128)")
    g.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for grouped-query attention (default: as many as query heads)")
    g.add_argument("--max-seq-len", type=int, default=256, help="context length in tokens")
    g.add_argument("--model-tag", default=None, help="checkpoint name (default: d<depth>)")
    g = p.add_argument_group("training (base, mid, sft, rl)")
    g.add_argument("--device-batch-size", type=int, default=16, help="sequences per forward pass on each device")
    g.add_argument("--total-batch-size", type=int, default=8192, help="tokens per optimizer step (gradient accumulation makes up the rest)")
    g.add_argument("--num-iterations", type=int, default=-1,
                   help="optimizer steps (-1: the stage's default: base 400, mid 150, sft 150, rl 60)")
    g.add_argument("--target-param-data-ratio", type=float, default=None,
                   help="base: training tokens per parameter, used when --num-iterations is -1 (Chinchilla: 20)")
    g.add_argument("--lr-scale", type=float, default=None, help="multiply every learning rate (default: base/mid 1, sft 0.1, rl 0.05)")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate for the block matrices")
    g.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW learning rate for wte (scaled by (width/768)^-0.5)")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW learning rate for lm_head (scaled likewise)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps with linear LR warm-up")
    g.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps at the end with linear LR decay")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end as a fraction of the initial LR")
    g.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile the model (auto: on for CUDA only)")
    g.add_argument("--resume", action="store_true", help="continue this stage from its last checkpoint")
    g.add_argument("--seed", type=int, default=1337, help="random seed")
    g.add_argument("--eval-every", type=int, default=100,
                   help="steps between validation evaluations (bits per byte, loss, or rl's pass@k; 0: start and end only)")
    g.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    g.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    g.add_argument("--sample-prompts", nargs="*", default=["The capital of France is", "Once upon a time"],
                   help="base: prompts to continue at the end of training")
    g = p.add_argument_group("rl (simplified GRPO)")
    g.add_argument("--num-samples", type=int, default=8, help="answers sampled per problem: the group size G, and the k of pass@k")
    g.add_argument("--prompts-per-step", type=int, default=8, help="problems per optimizer step (split across ranks)")
    g.add_argument("--pass-k-problems", type=int, default=400,
                   help="held-out problems for pass@k before, during (--eval-every) and after RL; RL's gain is a few "
                   "points, so it is measured on more problems than the chat evaluations")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature for rl and chat (0: greedy; default: rl 1.0, chat 0.6)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="longest sampled answer in tokens (default: rl 128, chat 256)")
    g = p.add_argument_group("eval and chat")
    g.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint to load")
    g.add_argument("--eval-items", type=int, default=200, help="held-out items per task in chat evaluations")
    g.add_argument("--core-bundle", default=None, help="eval --source base: folder of the DCLM eval bundle for CORE (core.yaml, "
                   "eval_meta_data.csv, eval_data/); default <base_dir>/eval_bundle, downloaded there with --data hf")
    g.add_argument("--max-per-task", type=int, default=-1, help="eval: at most this many items per CORE task and per real chat task (-1: all)")
    g.add_argument("--humaneval", action="store_true", help="eval --data hf: also run HumanEval, executing the model's code in a "
                   "sandbox (Linux, bubblewrap: read-only system files only, no other processes, no network, limits)")
    g.add_argument("-p", "--prompt", default=None, help="chat: answer this one message and exit")
    g.add_argument("--top-k", type=int, default=50, help="chat: sample among the k most likely tokens")
    g = p.add_argument_group("report")
    g.add_argument("--report-path", default="report.md", help="where to write the markdown report")
    g.add_argument("--wall-seconds", type=int, default=None, help="the whole run's wall time, as measured by speedrun.sh")
    return p


def finalize_args(args):
    """Check the flags (raising UserError) and fill in the per-stage defaults."""
    if args.temperature is None:
        args.temperature = 1.0 if args.stage == "rl" else 0.6
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if args.stage == "rl" else 256
    for name in ("vocab_size", "depth", "max_seq_len", "device_batch_size", "total_batch_size", "eval_batches", "log_every",
                 "eval_items", "pass_k_problems"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        finalize_args(args)
        torch.manual_seed(args.seed)
        ddp = init_distributed()
        t0 = time.time()
        STAGES[args.stage](args, ddp)
        if ddp.is_master and args.stage not in ("chat", "report"):
            record_wall_time(args.stage if args.stage != "eval" else f"eval_{args.source}", time.time() - t0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

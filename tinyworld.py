"""
TinyWorld: a small synthetic world, written in code, that every stage of nanochat_one.py trains
and evaluates on by default, offline, in minutes on a laptop CPU.

What the world contains. Real facts in small tables (countries with their capitals and
continents; animals with their sounds, legs, homes, food and young; the colours of things;
opposites; days and months; numbers in words; jobs, foods, shapes, planets, materials) and
invented people (a few ordinary names and 280 built from syllables with a fixed seed). From the
tables the generators below write:
- pretraining documents: short encyclopedic paragraphs, 15 kinds of short stories, and (COPY_SHARE
  of the paragraphs) text that only a model reading its context can predict: lists read back, codes
  written twice, questions answered in sentences that repeat their subject, quizzes with lettered
  choices (tinyworld_document, tinyworld_documents);
- fact questions with one-sentence replies, and MMLU-style multiple choice whose wrong choices
  are answers of the same kind (tinyworld_fact_question, tinyworld_multiple_choice);
- conversations: identity, small talk, one to three fact questions (tinyworld_conversation);
- GSM8K-style word problems whose worked answers call the calculator as <<expr=result>> and end
  with a line "#### answer" (tinyworld_word_problem);
- the chat mixture for mid-training and SFT (tinyworld_chat_examples) and held-out items for
  evaluation and RL (tinyworld_eval_items).
Every fact comes from one table, so the documents, questions, chats and word problems never
contradict each other. The language is simple and regular, so a 4-layer model learns it in
minutes, yet wide enough for a BPE to learn ~4000 merges from 1 MB. Every generator takes a
random.Random: a fixed seed always gives the same data. The facts are real; the people invented.

Splits by hash. Every item has a key that names what it is about, never its wording
("capital:France", "wp:share:3,4"; document i has the key "doc:i"), and tinyworld_split(key)
puts it in train, val or test (about 80/10/10; fact questions 60/5/35) by a CRC32 of the key. So every phrasing of a
question lands in the same split, and stories that quote a question quote only training ones
(train_item). A conversation of two or three questions joins their keys
("capital:France|colour:snow") and belongs to a split only when every one of its questions does,
so no training conversation asks a held-out question.

How to extend it:
- a fact table: a list of tuples beside the others; to ask about it, a kind in FACT_KINDS with
  its question templates in _fact; to write about it, a para_ function added to PARAGRAPHS;
- a template: a story_ function (rng -> text) added to STORIES, or a wp_ function added to
  WORD_PROBLEMS (it returns the question, the calculator steps, the worked answer and the
  numbers that make its key);
- a task: a function rng -> dict(key=..., messages=[...]) added with a weight to CHAT_TASKS; to
  evaluate it, its items in tinyworld_eval_items and a line in nanochat_one.py's evaluate_chat.
Each of these changes the generated data, and tests/test_tinyworld.py pins digests of the first
items of every split: record the new digests on purpose.

This module imports nothing from nanochat_one.py (the arrow goes one way): nanochat_one.py
turns its conversations into tokens and batches.
"""
import random
import re
import zlib


# -----------------------------------------------------------------------------------------------
# Words: small helpers for writing English

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


def legs_word(legs):
    """How the world says a number of legs: 4 -> "four", 0 -> "no" (as in "A snake has no legs.")."""
    return ONES[legs] if legs else "no"


def legs_sentence(animal, legs):
    return f"{cap(a_an(animal))} has {legs_word(legs)} legs."


# -----------------------------------------------------------------------------------------------
# Splits: a stable hash of an item's key decides whether it is train, val or test

def tinyworld_split(key):
    """Stable split by a hash of the key: about 80% train, 10% val, 10% test; a fact question's key
    ("capital:Kenya", "add:3+4") 60% train, 5% val, 35% test, so that about 170 distinct facts of world
    knowledge are held out, each asked once. A held-out fact is still stated in the pretraining text;
    only its questions stay out of training: the test measures whether a model answers about what it
    read, not whether it saw the question."""
    if key.split(":", 1)[0] in FACT_KINDS:
        bucket = zlib.crc32(key.encode("utf-8")) % 20
        return "train" if bucket < 12 else "val" if bucket == 12 else "test"
    bucket = zlib.crc32(key.encode("utf-8")) % 10
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


def train_item(make, rng):
    """An item from make(rng) whose key is in the train split: stories quote questions, and
    those asked in the held-out splits must never appear in training text."""
    while True:
        item = make(rng)
        if tinyworld_split(item["key"]) == "train":
            return item


# -----------------------------------------------------------------------------------------------
# Fact questions. _fact returns the item and the answers of the same type, which multiple choice
# uses as distractors. The key names the fact asked about (kind and subject), never the wording,
# so a split by key keeps every phrasing of one question in the same split.

ALL_CAPITALS = [k for _, k, _ in COUNTRIES]
ALL_COUNTRIES = [c for c, _, _ in COUNTRIES]
ALL_SOUNDS = sorted({a[2] for a in ANIMALS})
ALL_YOUNG = sorted({a[6] for a in ANIMALS})
ALL_WORDS_WITH_OPPOSITES = sorted(OPPOSITE_OF)
LEG_WORDS = [legs_word(n) for n in (0, 2, 4, 6, 8)]
FACT_KINDS = ["capital", "continent", "country", "sound", "legs", "young", "colour", "opposite", "day_after",
              "day_before", "month_after", "add", "sub"]
ARITHMETIC_KINDS = ("add", "sub")  # mental arithmetic; the other kinds are world knowledge
# The possible answers of each kind of question: multiple choice draws its wrong choices from them,
# and nanochat_one.py's grader looks for them in a reply. Sums and differences are whole numbers.
FACT_ANSWERS = dict(capital=ALL_CAPITALS, continent=CONTINENTS, country=ALL_COUNTRIES, sound=ALL_SOUNDS,
                    legs=LEG_WORDS, young=ALL_YOUNG, colour=COLOURS, opposite=ALL_WORDS_WITH_OPPOSITES,
                    day_after=DAYS, day_before=DAYS, month_after=MONTHS)


# A world fact's reply names its subject after the words its questions put before it ("the capital
# of Kenya", "the country of Ghana", "the colour of snow"), so a look back that matches those words
# copies it. A name that opens a reply is other tokens than the same name inside a question ("G"
# "hana" against " Ghana"): when replies began with the subject ("Ghana is in Africa."), the
# speedrun's model never named it in a reply to a held-out question.
def _fact(rng, kind):
    def item(key, templates, subject, answer, reply, pool=FACT_ANSWERS.get(kind)):
        return {"key": key, "question": rng.choice(templates).format(subject), "answer": answer, "reply": reply}, pool

    if kind in ("capital", "continent", "country"):
        c, k, m = rng.choice(COUNTRIES)
        if kind == "capital":
            return item(f"capital:{c}", ["What is the capital of {}?", "Which city is the capital of {}?",
                                         "Name the capital of {}.", "What city is the capital of {}?"],
                        c, k, f"The capital of {c} is {k}.")
        if kind == "continent":
            return item(f"continent:{c}", ["On which continent is the country of {}?", "Which continent is the "
                                           "country of {} in?", "The country of {} is on which continent?"],
                        c, m, f"The country of {c} is in {m}.")
        return item(f"country:{k}", ["The city of {} is the capital of which country?", "Which country has the city "
                                     "of {} as its capital?", "Of which country is the city of {} the capital?"],
                    k, c, f"The city of {k} is the capital of {c}.")
    if kind in ("sound", "legs", "young"):
        name, _, sound, legs, _, _, young = rng.choice(ANIMALS)
        if kind == "sound":
            return item(f"sound:{name}", ["What sound does {} make?", "What noise does {} make?", "How does {} sound?"],
                        a_an(name), sound, f"{cap(a_an(name))} {sound}.")
        if kind == "legs":
            return item(f"legs:{name}", ["How many legs does {} have?", "How many legs has {}?"], a_an(name),
                        legs_word(legs), legs_sentence(name, legs))
        return item(f"young:{name}", ["What is a young {} called?", "What do we call a young {}?"], name, young,
                    f"A young {name} is called {a_an(young)}.")
    if kind == "colour":
        thing, colour = rng.choice(COLOURS_OF_THINGS)
        return item(f"colour:{thing}", ["What is the colour of {}?", "Do you know the colour of {}?",
                                        "Tell me the colour of {}."],
                    thing, colour, f"The colour of {thing} is {colour}.")
    if kind == "opposite":
        word = rng.choice(ALL_WORDS_WITH_OPPOSITES)
        return item(f"opposite:{word}", ["What is the opposite of {}?", "Which word is the opposite of {}?",
                                         "Tell me the opposite of {}."], word, OPPOSITE_OF[word],
                    f"The opposite of {word} is {OPPOSITE_OF[word]}.")
    if kind == "day_after":
        i = rng.randrange(7)
        return item(f"day_after:{DAYS[i]}", ["What day comes after {}?", "Which day is after {}?"], DAYS[i],
                    DAYS[(i + 1) % 7], f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}.")
    if kind == "day_before":
        i = rng.randrange(7)
        return item(f"day_before:{DAYS[i]}", ["What day comes before {}?", "Which day is before {}?"], DAYS[i],
                    DAYS[i - 1], f"The day before {DAYS[i]} is {DAYS[i - 1]}.")
    if kind == "month_after":
        i = rng.randrange(12)
        return item(f"month_after:{MONTHS[i]}", ["What month comes after {}?", "Which month is after {}?"], MONTHS[i],
                    MONTHS[(i + 1) % 12], f"After {MONTHS[i]} comes {MONTHS[(i + 1) % 12]}.")
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
    """MMLU-style item: the answer plus 3 distinct wrong answers of the same type, shuffled; "cloze"
    is the fact's answer sentence split for cloze scoring (choice_sentences)."""
    fact, pool = _fact(rng, rng.choice(FACT_KINDS))
    answer, question_words = fact["answer"], set(fact["question"].rstrip("?.").split())
    # skip options that appear in the question or inside the answer ("black" for "black and white"),
    # and those that end in the answer's last word ("North America" for "South America"): a reply
    # copies the letter written after that word (multiple_choice_conversation)
    wrong = [p for p in pool if p not in answer and p not in question_words
             and p.split()[-1] != answer.split()[-1]]
    choices = rng.sample(wrong, 3) + [answer]
    rng.shuffle(choices)
    return {"key": fact["key"], "question": fact["question"], "choices": choices, "answer": choices.index(answer),
            "cloze": choice_sentences(fact["reply"], answer, choices)}


def choice_sentences(reply, answer, choices):
    """The answer sentence said with each choice in the answer's place, as (the words every version
    shares, [each choice's ending]): the cloze form of a multiple-choice item.
        "A young cat is called a kitten.", "kitten", ["kitten", "eaglet"]
        -> ("A young cat is called", ["a kitten.", "an eaglet."])
    The answer is the last thing a reply names, so its last occurrence is the one replaced."""
    at = reply.rfind(answer)
    head, tail = reply[:at], reply[at + len(answer):]
    article = re.search(r"\b(a|an) $", head)  # "called a kitten" but "called an eaglet"
    if article:
        head = head[:article.start()]
    words = [(head + (a_an(choice) if article else choice) + tail).split(" ") for choice in choices]
    shared = 0
    while all(len(w) > shared + 1 and w[shared] == words[0][shared] for w in words):
        shared += 1
    return " ".join(words[0][:shared]), [" ".join(w[shared:]) for w in words]


# -----------------------------------------------------------------------------------------------
# Pretraining documents. Each function writes one short paragraph; stories reuse the same facts.


def para_country(rng):
    country, capital, continent = rng.choice(COUNTRIES)
    other = rng.choice([c for c, _, k in COUNTRIES if k == continent and c != country])
    extra = [f"{capital} is a city in {country}.", f"The city of {capital} is the capital of {country}.",
             f"Many people live in {capital}.",
             f"{country} and {other} are both in {continent}.", f"If you visit {capital}, you are in {country}."]
    first = rng.choice([f"{country} is a country in {continent}.", f"The country of {country} is in {continent}."])
    return " ".join([first, f"The capital of {country} is {capital}."] + rng.sample(extra, rng.randint(1, 3)))


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
    said = rng.choice(["{} is {}.", "The colour of {} is {}."])
    return " ".join(cap(said.format(*pair)) for pair in rng.sample(COLOURS_OF_THINGS, rng.randint(3, 6)))


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

# -----------------------------------------------------------------------------------------------
# Text that pays for reading the context. A small model learns to copy from its context (induction
# heads: find the earlier occurrence of the current token, predict what followed it) only when
# copying is, for many steps, the best way to lower the loss. In the paragraphs above a name or a
# subject comes back at the same places of the same templates, which a model predicts without
# looking back. Here what comes back is drawn at random, so only a look back predicts it: lists
# read back, made-up codes written down twice, questions answered in sentences that repeat them.

LIST_WORDS = sorted({*NAMES, *ALL_CAPITALS, *ALL_COUNTRIES, *(a[0] for a in ANIMALS), *COLOURS, *DAYS, *MONTHS,
                     *(t[0] for t in THINGS), *NUMBER_WORDS[:21], *INSTRUMENTS, *SPORTS, *(j[0] for j in JOBS)})


def made_up_word(rng):
    """A nonsense word of 2-3 syllables or a number, for codes no model can guess."""
    if rng.random() < 0.2:
        return str(rng.randint(0, 999))
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 2, 3))))


def copy_memory_game(rng):
    name, friend, _ = two_names(rng)
    words = ", ".join(rng.sample(LIST_WORDS, rng.randint(5, 16)))
    said, back = rng.choice([("said", "said them back"), ("read out a list", "repeated the list"),
                             ("wrote down some words", "read the words aloud")])
    return f"{name} and {friend} played a memory game. {name} {said}: {words}. Then {friend} {back}: {words}."


def copy_secret_code(rng):
    name, friend, p = two_names(rng)
    code = " ".join(made_up_word(rng) for _ in range(rng.randint(4, 12)))
    return (f"{name} made up a secret code and wrote it on a card: {code}. {cap(p)} gave the card to {friend}. "
            f"{friend} read it slowly, \"{code}\", and smiled.")


def copy_interview(rng):
    name, friend, _ = two_names(rng)
    facts = [train_item(tinyworld_fact_question, rng) for _ in range(rng.randint(2, 4))]
    return f"{name} asked {friend} some questions. " + " ".join(
        f"\"{f['question']}\" {friend} answered, \"{f['reply']}\"" for f in facts)


def copy_quiz(rng):
    """A quiz in the form of multiple_choice_conversation, in plain text: the answer names the choice,
    then copies the letter written right after it in the list."""
    item = train_item(tinyworld_multiple_choice, rng)
    return f"Quiz: {item['question']}\n{lettered_choices(item['choices'])}\nAnswer: {multiple_choice_reply(item)}"


COPYING = [copy_memory_game, copy_secret_code, copy_interview, copy_quiz]
COPY_SHARE = 0.3  # of the paragraphs of a document

PARAGRAPHS = [para_country, para_continent, para_animal, para_colours, para_opposites, para_days, para_months,
              para_counting, para_arithmetic, para_job, para_food, para_science]
STORIES = [story_outing, story_market, story_trip, story_dialogue, story_lost, story_fable, story_counting,
           story_cooking, story_school, story_seasons, story_hobbies, story_birthday, story_walk, story_weather,
           story_shop]


def tinyworld_document(rng):
    """One pretraining document: 1-6 paragraphs separated by blank lines, a bit under half of them stories."""
    count = rng.choice((1, 2, 3, 3, 4, 4, 5, 6))  # favour 3-4 so most documents are 300-1500 characters
    def paragraph():
        r = rng.random()
        return rng.choice(COPYING if r < COPY_SHARE else STORIES if r < COPY_SHARE + 0.45 * (1 - COPY_SHARE)
                          else PARAGRAPHS)(rng)

    return "\n\n".join(paragraph() for _ in range(count))


def tinyworld_documents(split, start=0):
    """Yield (position, text) forever. Document i is generated from its own seed and belongs to
    one split by a stable hash of its index, so every run sees the same documents in order."""
    i = start
    while True:
        if tinyworld_split(f"doc:{i}") == split:
            yield i, tinyworld_document(random.Random(i))
        i += 1


# -----------------------------------------------------------------------------------------------
# Conversations: identity, small talk and fact questions, for mid-training and SFT.

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


# Harder word problems, for SFT and RL: three events change what someone has, and each
# event's wording decides its operation ("finds 5 more" adds, "gives 5 to Tom" subtracts, "buys 3
# packs of 4" multiplies then adds, "gives half of them away" halves). Some numbers are written in
# words, and one sentence gives a number that does not matter. 3 to 6 calculator calls, every
# result a whole number in 0..1000.

OBJECT_PRONOUN = {"she": "her", "he": "him"}


def say_number(rng, n):
    """n in digits, or (two times in five, up to 100) in words: the model must read both."""
    return number_to_words(n) if n <= 100 and rng.random() < 0.4 else str(n)


def hwp_event(rng, have, p, friend, items):
    """One event: (sentence, solution text, the new amount)."""
    kinds = ["gain", "lose", "packs"] + (["half"] if have % 2 == 0 and have >= 4 else [])
    kind = rng.choice(kinds)
    if kind == "gain":
        n = rng.randint(2, 30)
        sentence = rng.choice([f"{cap(p)} finds {{}} more.", f"{friend} gives {OBJECT_PRONOUN[p]} {{}} more.",
                               f"{cap(p)} buys {{}} more."]).format(say_number(rng, n))
        (_, r), text = calc(have, "+", n)
        return sentence, f"{cap(p)} gets {n} more: {text}.", r
    if kind == "lose" and have >= 2:
        n = rng.randint(1, min(have - 1, 30))
        sentence = rng.choice([f"{cap(p)} gives {{}} to {friend}.", f"{cap(p)} loses {{}}.",
                               f"{cap(p)} sells {{}}."]).format(say_number(rng, n))
        (_, r), text = calc(have, "-", n)
        return sentence, f"{cap(p)} has {n} fewer: {text}.", r
    if kind == "half":
        (_, r), text = calc(have, "/", 2)
        return f"{cap(p)} gives half of them to {friend}.", f"Half of {have} is {text}.", r
    k, n = rng.randint(2, 6), rng.randint(2, 10)
    (_, m), t1 = calc(k, "*", n)
    (_, r), t2 = calc(have, "+", m)
    sentence = f"{cap(p)} buys {say_number(rng, k)} packs with {say_number(rng, n)} {items} in each pack."
    return sentence, f"{k} packs of {n} make {t1}, so {p} has {t2}.", r


def tinyworld_hard_word_problem(rng):
    """A word problem of tinyworld_word_problem's form, harder: see the section comment."""
    name, friend, p = two_names(rng)
    items, other = rng.sample(SMALL_ITEMS, 2)
    have = start = rng.randint(5, 40)
    sentences, texts = [], [f"{name} starts with {start} {items}."]
    for _ in range(3):
        sentence, text, have = hwp_event(rng, have, p, friend, items)
        sentences.append(sentence)
        texts.append(text)
    distractor = rng.choice([f"{friend} has {{}} {other}.", f"{friend} is {{}} years old.",
                             "The shop is {} minutes away."]).format(say_number(rng, rng.randint(2, 60)))
    sentences.insert(rng.randint(0, len(sentences)), distractor)
    question = (f"{name} has {say_number(rng, start)} {items}. " + " ".join(sentences) +
                f" How many {items} does {name} have now?")
    steps = [(m.group(1), int(m.group(2))) for m in re.finditer(r"<<([^=]*)=(\d+)>>", " ".join(texts))]
    # the key names the arithmetic, not the wording: the same problem told in other words is in the same split
    return {"key": "hwp:" + ",".join(expression for expression, _ in steps), "question": question, "steps": steps,
            "answer_text": " ".join(texts) + f"\n#### {have}", "answer": have, "name": name}


# -----------------------------------------------------------------------------------------------
# Chat formats: a multiple-choice item and a word problem as conversations. The real MMLU and
# GSM8K rows that nanochat_one.py loads take the same forms.

LETTERS = "ABCDEFGHIJ"


def lettered_choices(choices):
    """Each choice on its line with its letter after it: "- Seoul A\\n- Tokyo B". The letter right after
    the choice's last word is what a small model can read: a reply that names the choice ("... is
    Tokyo") copies the token that followed that word before, one look back of an induction head. With
    the letter first ("B. Tokyo") or apart ("Tokyo=B") the look back lands on the wrong token, and the
    tiny model stayed at chance in every such form measured; nanochat also puts the letter after."""
    return "\n".join(f"- {choice} {LETTERS[i]}" for i, choice in enumerate(choices))


def multiple_choice_conversation(question, choices, answer=None, reply=None):
    """MMLU-style item as a conversation whose answer ends with the letter: user "What is the capital
    of Japan?\\n- Seoul A\\n- Tokyo B\\n...\\nAnswer with the letter." -> assistant `reply`
    (TinyWorld's: "The capital of Japan is Tokyo B.", multiple_choice_reply) or the letter alone ("B":
    MMLU and ARC rows, which have no answer sentence)."""
    messages = [dict(role="user", content=f"{question}\n{lettered_choices(choices)}\nAnswer with the letter.")]
    if answer is not None:
        messages.append(dict(role="assistant", content=reply or LETTERS[answer]))
    return dict(messages=messages)


def multiple_choice_reply(item, calculator=False):
    """A TinyWorld item's reply: its answer sentence with the letter right after the answer, where
    the list has it: "The capital of Japan is Tokyo B."; when the sentence goes on past the answer,
    the answer is said again: "A pig has four legs: four B.". With `calculator`, a sum is worked out
    as the word problems work theirs: "14 plus 8 is <<14+8=22>>22 C." (calculator_parts)."""
    shared, endings = item["cloze"]
    ending, answer, letter = endings[item["answer"]], item["choices"][item["answer"]], LETTERS[item["answer"]]
    kind, subject = item["key"].split(":", 1)
    if calculator and kind in ARITHMETIC_KINDS:
        return f"{shared} <<{subject}={answer}>>{answer} {letter}."
    end = ending.rfind(answer) + len(answer)
    if ending[end:] == ".":
        return f"{shared} {ending[:end]} {letter}."
    return f"{shared} {ending[:-1]}: {answer} {letter}."


def reply_letter(reply):
    """The letter a multiple-choice reply ends with ("The capital of Japan is Tokyo B." -> "B"; "B" ->
    "B"), or None: the letter must be the reply's last word."""
    match = re.search(r"(?:^|\s)([A-J])\.?$", reply.strip())
    return match.group(1) if match else None


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


# -----------------------------------------------------------------------------------------------
# Chat tasks: the mixture for mid-training and SFT, and held-out items for evaluation

def tinyworld_multiple_choice_chat(rng):
    """A multiple-choice item as mid and SFT train it: the reply names the choice and copies its letter;
    a sum uses the calculator (mental arithmetic stays near chance at this size, and the choice to copy
    must be the right one)."""
    item = tinyworld_multiple_choice(rng)
    reply = multiple_choice_reply(item, calculator=True)
    reply = calculator_parts(reply) if "<<" in reply else reply
    return dict(key=item["key"], **multiple_choice_conversation(item["question"], item["choices"], item["answer"],
                                                                 reply))


def tinyworld_word_problem_chat(rng):
    item = tinyworld_word_problem(rng)
    return dict(key=item["key"], **word_problem_conversation(item["question"], item["answer_text"]))


def tinyworld_hard_word_problem_chat(rng):
    item = tinyworld_hard_word_problem(rng)
    return dict(key=item["key"], **word_problem_conversation(item["question"], item["answer_text"]))


# Each chat stage's mixture of TinyWorld tasks, generator -> weight. Mid teaches the format: small
# talk, facts in letter form, the calculator on easy problems. SFT adds what mid never shows, the
# harder word problems, which RL then practises, and keeps all of mid's mixture (two thirds of its
# examples), as nanochat keeps SmolTalk in its SFT: a stage that stops showing a task forgets it.
CHAT_TASKS = dict(
    mid={tinyworld_conversation: 4, tinyworld_multiple_choice_chat: 2, tinyworld_word_problem_chat: 2},
    sft={tinyworld_conversation: 4, tinyworld_multiple_choice_chat: 2, tinyworld_word_problem_chat: 2,
         tinyworld_hard_word_problem_chat: 4},
)


def tinyworld_chat_examples(split, start=0, stage="mid"):
    """Yield (position, conversation) forever: the stage's weighted mixture of chat tasks. Example i
    comes from its own seed; it is kept only if its key hashes into `split`, and a conversation
    of several questions (keys joined by "|") only if every one of its keys does, so a question
    of the test split is never asked in training (it may appear in pretraining text)."""
    makers, weights = list(CHAT_TASKS[stage]), list(CHAT_TASKS[stage].values())
    i = start
    while True:
        rng = random.Random(f"chat-{stage}-{i}" if stage != "mid" else f"chat-{i}")
        conversation = rng.choices(makers, weights)[0](rng)
        if all(tinyworld_split(key) == split for key in conversation["key"].split("|")):
            yield i, conversation
        i += 1


def tinyworld_eval_items(task, split="test", n=400, seed=0):
    """n held-out items of one task ("fact", "multiple_choice", "word_problem" or "hard_word_problem"); fewer
    if the split runs out. Word problems: no two with the same question (thousands in the test split).
    Facts and multiple choice: no two about the same fact, in one of its wordings each; the test split
    holds 398 facts (169 of world knowledge, 229 sums and differences), so n=400 takes them all."""
    make = dict(fact=tinyworld_fact_question, multiple_choice=tinyworld_multiple_choice,
                word_problem=tinyworld_word_problem, hard_word_problem=tinyworld_hard_word_problem)[task]
    by_fact = task in ("fact", "multiple_choice")  # a fact asked twice is one item, however it is worded
    rng, items, seen = random.Random(f"eval-{task}-{seed}"), [], set()
    # the rarest question takes ~100,000 draws to meet; the rarest fact (a sum of two given numbers) ~6,000
    for _ in range((200 if by_fact else 1000) * n):
        item = make(rng)
        name = item["key"] if by_fact else item["question"]
        if tinyworld_split(item["key"]) == split and name not in seen:
            seen.add(name)
            items.append(item)
            if len(items) == n:
                break
    return items


def answer_sentence_start(item):
    """A fact's answer sentence up to its answer, for the model to complete: what it knows, whether or
    not it can begin the answer itself. "The capital of Kenya is Nairobi." -> "The capital of Kenya
    is"; "A dog has four legs." -> "A dog has"."""
    return item["reply"][:item["reply"].rindex(item["answer"])].rstrip()


def fact_is_correct(reply, item):
    """A reply to a TinyWorld fact question is right when the last possible answer its first sentence
    names is the answer, and every other one it names is the answer or the question's subject.
    Possible answers are those of the question's kind in FACT_ANSWERS and any whole
    number, found as whole words, case aside, longest first; the subject is in the item's key.
    For "What day comes before Sunday?" (key "day_before:Sunday", answer "Saturday"):
        "The day before Sunday is Saturday."  right: Sunday is the subject, Saturday comes last
        "Saturday"                            right
        "The day before Saturday is Friday."  wrong: it ends on another day
        "Friday or Saturday."                 wrong: it names another day
        "Saturdays."                          wrong: no day as a whole word
    Every reply TinyWorld trains on names its answer last: "A young cat is called a kitten.",
    "A dog has four legs.", "3 plus 4 is 7." (the operands 3 and 4 are that question's subject)."""
    kind, subject = item["key"].split(":", 1)
    subjects = re.split(r"[-+]", subject) if kind in ("add", "sub") else [subject]  # "add:3+4": 3 and 4
    names = sorted({item["answer"], *subjects, *FACT_ANSWERS.get(kind, [])}, key=len, reverse=True)
    pattern = r"(?<!\w)(" + "|".join(re.escape(name.lower()) for name in names) + r"|\d+)(?!\w)"
    sentence = " ".join(re.split(r"[.!?](?:\s|$)|\n", reply.strip(), maxsplit=1)[0].lower().split())
    said = re.findall(pattern, sentence)
    allowed = {item["answer"].lower(), *(s.lower() for s in subjects)}
    return bool(said) and said[-1] == item["answer"].lower() and all(name in allowed for name in said)

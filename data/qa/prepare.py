"""Write a small synthetic question-answering set for fine-tuning the Shakespeare char model.

    python data/qa/prepare.py            # -> data/qa/train.jsonl, data/qa/val.jsonl (chat format)
                                         #    and data/qa/pairs_{train,val}.jsonl (preference pairs, for DPO)

Nothing here is real data: questions and answers come from a few templates (greetings, spelling,
opposites, sums in words, facts about the plays). Every character is one that Tiny Shakespeare
contains (letters, space, newline and !$&',-.3:;?), because the char model knows no others; and
each conversation fits the model's 64-token window together with the chat markers.

A preference pair asks one question and prefers its correct answer to a near miss: a sum off by
one, a spelling with two letters swapped, or the answer to another question of the same kind
(another name greeted, another play's setting).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = """Romeo Juliet Hamlet Othello Iago Portia Viola Puck Oberon Titania Lear Cordelia Macbeth Banquo
Duncan Horatio Ophelia Laertes Polonius Falstaff Rosalind Orlando Prospero Miranda Ariel Caliban Antonio
Bassanio Shylock Jessica Brutus Cassius Caesar Antony Cleopatra Benedick Beatrice Claudio Hero Petruchio
Bianca Tybalt Mercutio Benvolio Paris Nerissa Sebastian Olivia Orsino Malvolio Feste Edgar Edmund Goneril
Regan Kent Gloucester Desdemona Emilia Lysander Hermia Helena Demetrius Theseus Angelo Isabella""".split()
WORDS = """love king queen sword crown night day moon star rose heart blood death life fool ghost storm
sea ship gold tears sleep dream wine bread fire rain wind earth honour grace""".split()
OPPOSITES = [("hot", "cold"), ("day", "night"), ("love", "hate"), ("young", "old"), ("rich", "poor"),
             ("war", "peace"), ("true", "false"), ("light", "dark"), ("good", "evil"), ("high", "low"),
             ("wise", "foolish"), ("sweet", "bitter"), ("life", "death"), ("king", "beggar"), ("fair", "foul"),
             ("early", "late"), ("friend", "foe"), ("joy", "sorrow"), ("laugh", "weep"), ("sleep", "wake")]
NUMBERS = "zero one two three four five six seven eight nine ten".split()
PLAYS = {"Hamlet": ("Denmark", "Hamlet, the prince"), "Macbeth": ("Scotland", "Macbeth, the thane"),
         "Othello": ("Venice", "Othello, the Moor"), "King Lear": ("Britain", "Lear, the old king"),
         "The Tempest": ("an island", "Prospero, the magician"), "Julius Caesar": ("Rome", "Brutus, the Roman"),
         "Twelfth Night": ("Illyria", "Viola, the twin"), "Romeo and Juliet": ("Verona", "two young lovers")}
SPOUSES = {"Othello": "Desdemona", "Macbeth": "Lady Macbeth", "Romeo": "Juliet", "Petruchio": "Katherine",
           "Bassanio": "Portia", "Orsino": "Viola", "Oberon": "Titania", "Brutus": "Portia"}


def greet(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    q = rng.choice(["Greet {}.", "Say hello to {}.", "Bid {} good day."]).format(name)
    return q, rng.choice(["Good morrow, {}!", "Hail, {}! Well met."]).format(name)


def spell(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS + [n.lower() for n in NAMES if len(n) <= 7])
    q = rng.choice(["Spell {}.", "How dost thou spell {}?"]).format(word)
    return q, "-".join(word.upper()) + "."


def opposite(rng: random.Random) -> tuple[str, str]:
    a, b = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    q = rng.choice(["What is the opposite of {}?", "Opposite of {}?"]).format(a)
    return q, f"The opposite is {b}."


def add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    q = rng.choice(["What is {} and {}?", "Add {} and {}."]).format(NUMBERS[a], NUMBERS[b])
    return q, f"{NUMBERS[a].capitalize()} and {NUMBERS[b]} make {NUMBERS[a + b]}."


def play(rng: random.Random) -> tuple[str, str]:
    title, (place, hero) = rng.choice(list(PLAYS.items()))
    kind = rng.randrange(3)
    if kind == 0:
        return f"Where is {title} set?", f"In {place}."
    if kind == 1:
        return f"Who is {title} about?", f"About {hero}."
    return f"Who wrote {title}?", "William Shakespeare."


def spouse(rng: random.Random) -> tuple[str, str]:
    who, wife = rng.choice(list(SPOUSES.items()))
    return rng.choice(["Who is the wife of {}?", "Whom did {} wed?"]).format(who), f"{wife}."


TASKS = [greet, spell, opposite, add, play, spouse]


def conversation(rng: random.Random) -> dict:
    q, a = rng.choice(TASKS)(rng)
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def preference_pair(rng: random.Random) -> dict:
    """{"prompt", "chosen", "rejected"}: the right answer, and a near miss of the same form."""
    task = rng.choice(TASKS)
    q, a = task(rng)
    if task is add:  # the sum off by one
        *head, total = a[:-1].split(" ")
        n = NUMBERS.index(total)
        wrong = " ".join(head + [NUMBERS[n + 1 if n == 0 or (n < 10 and rng.random() < 0.5) else n - 1]]) + "."
    elif task is spell and len(set(a[:-1].split("-"))) > 1:  # two neighbouring letters swapped
        letters = a[:-1].split("-")
        i = rng.choice([i for i in range(len(letters) - 1) if letters[i] != letters[i + 1]])
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
        wrong = "-".join(letters) + "."
    else:  # the answer to another question of the same kind
        wrong = a
        while wrong == a:
            _, wrong = task(rng)
    return {"prompt": q, "chosen": a, "rejected": wrong}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent), help="folder for train.jsonl and val.jsonl")
    ap.add_argument("--train", type=int, default=3000, help="training conversations")
    ap.add_argument("--val", type=int, default=200, help="validation conversations")
    ap.add_argument("--pairs", type=int, default=2000, help="training preference pairs (validation: --val)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    conversations, pairs = random.Random(args.seed), random.Random(args.seed + 1)  # pairs leave the chats as they were
    for name, n, make, what in (("train", args.train, conversation, "conversations"),
                                ("val", args.val, conversation, "conversations"),
                                ("pairs_train", args.pairs, preference_pair, "preference pairs"),
                                ("pairs_val", args.val, preference_pair, "preference pairs")):
        rng = conversations if make is conversation else pairs
        path = out / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(make(rng)) + "\n")
        print(f"wrote {n} {what} to {path}")

if __name__ == "__main__":
    main()

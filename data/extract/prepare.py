"""Write a small synthetic extraction set: a customer record, then a request to copy some of its fields.

    python data/extract/prepare.py       # -> data/extract/train.jsonl, data/extract/val.jsonl (chat format)

Nothing here is real data: names, account numbers, addresses, emails and phone numbers are drawn at
random from syllables and digits, so a model cannot answer from memory and has to copy the spans out of
the request, exactly the kind of reply `--speculate ngram` (prompt lookup) speeds up. One record:

    {"messages": [
        {"role": "user", "content": "Customer record\\nName: Vela Morandi-Kost\\nAccount number: 4417-...\\n
            ...\\n\\nCopy the customer's name, email and phone exactly as written above."},
        {"role": "assistant", "content": "Name: Vela Morandi-Kost\\nEmail: ...\\nPhone: ..."}]}

The fields asked for are a random subset of the record's, in the record's order. `python
bench/speculative.py --ckpt out/sft_extract --chat --prompt-file data/extract/val.jsonl` times decoding a
reply with and without speculation (configs/sft_extract.yaml trains the model).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYLLABLES = """ka lo mi ra ve to sa nu de li mo ren bas tor vel kin dar sol mar ine ost wen lin hal bro fel
gar tis und ova eck""".split()
STREETS = "Road Street Lane Avenue Close Way Terrace Crescent".split()
PLANS = ["Business Broadband 500", "Home Fibre 150", "Mobile Unlimited", "Basic Phone", "Office Bundle 1000"]
MONTHS = "January February March April May June July August September October November December".split()
FIELDS = ["Name", "Account number", "Address", "Email", "Phone"]
WORDS = {"Name": "name", "Account number": "account number", "Address": "address", "Email": "email",
         "Phone": "phone"}


def word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables))


def customer(rng: random.Random) -> dict[str, str]:
    """One made-up customer: every field a fresh draw."""
    first, last = word(rng, rng.randint(2, 3)).title(), word(rng, rng.randint(2, 3)).title()
    if rng.random() < 0.3:
        last += "-" + word(rng, 2).title()
    town, street = word(rng, 3).title(), word(rng, 2).title()
    postcode = f"{rng.choice('ABCDEFGHKLMNPRST')}{rng.choice('ABCDEFGHKLMNPRST')}{rng.randint(1, 9)} " \
               f"{rng.randint(1, 9)}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}"
    domain = f"{word(rng, 2)}-{rng.choice(['mail', 'post', 'net'])}.{rng.choice(['org', 'com', 'net'])}"
    return {
        "Name": f"{first} {last}",
        "Account number": "-".join(f"{rng.randint(0, 9999):04d}" for _ in range(4)),
        "Address": f"{rng.choice(['', f'Flat {rng.randint(1, 40)}, '])}{rng.randint(1, 199)} {street} "
                   f"{rng.choice(STREETS)}, {town}, {postcode}",
        "Email": f"{first[0].lower()}.{last.lower()}@{domain}",
        "Phone": f"+{rng.randint(1, 49)} {rng.randint(10, 99)} {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
    }


def record(rng: random.Random) -> dict:
    """A record with a plan and a note, a request for some of its fields, and the fields copied."""
    c = customer(rng)
    plan = f"{rng.choice(PLANS)} (renewed {rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(2019, 2026)})"
    lines = ["Customer record"] + [f"{f}: {c[f]}" for f in FIELDS] + [f"Plan: {plan}"]
    asked = [f for f in FIELDS if rng.random() < 0.7] or [rng.choice(FIELDS)]
    names = [WORDS[f] for f in asked]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    request = "\n".join(lines) + f"\n\nCopy the customer's {listed} exactly as written above."
    return {"messages": [{"role": "user", "content": request},
                         {"role": "assistant", "content": "\n".join(f"{f}: {c[f]}" for f in asked)}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder")
    parser.add_argument("--train", type=int, default=4000, help="training records")
    parser.add_argument("--val", type=int, default=200, help="validation records")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train", args.train, 1), ("val", args.val, 2)):
        rng = random.Random(seed)
        with open(args.out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(record(rng)) + "\n" for _ in range(count))
        print(f"wrote {count} records to {args.out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()

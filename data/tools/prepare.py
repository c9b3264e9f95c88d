"""Write a small synthetic tool-use set: requests that need one of a few tools, in OpenAI's chat format.

    python data/tools/prepare.py          # -> data/tools/train.jsonl, data/tools/val.jsonl

Nothing here is real data. Four tools with typed parameters — a weather lookup, a unit conversion, a
calendar entry and an employee directory lookup — and requests phrased from a few templates. Each record
offers the model two or three of the tools (always the one the request needs, in a random order) and is
one exchange in OpenAI's fine-tuning format:

    {"tools": [...], "messages": [
        {"role": "user", "content": "What's the weather in Oslo in celsius?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\", \\"unit\\": \\"celsius\\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\\"temperature\\": 4, \\"conditions\\": \\"rain\\"}"},
        {"role": "assistant", "content": "It is 4 degrees celsius with rain in Oslo."}]}

About one record in eight needs no tool (a greeting, a thank-you) and is answered in plain text, so a
model learns when not to call. The validation set uses another seed and shares no tool request with training.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CITIES = """Oslo Paris Lisbon Nairobi Lima Osaka Denver Cairo Dublin Quito Perth Hanoi Zurich Austin Accra
Bergen Porto Delhi Seoul Malmo Tunis Leeds Kyoto Boise""".split()
CONDITIONS = ["sunny", "cloudy", "rain", "snow", "fog", "wind"]
UNITS = {"km": "mi", "mi": "km", "kg": "lb", "lb": "kg", "c": "f", "f": "c", "m": "ft", "ft": "m"}
UNIT_NAMES = {"km": "kilometers", "mi": "miles", "kg": "kilograms", "lb": "pounds", "c": "celsius",
              "f": "fahrenheit", "m": "meters", "ft": "feet"}
FACTORS = {("km", "mi"): 0.621371, ("mi", "km"): 1.609344, ("kg", "lb"): 2.204623, ("lb", "kg"): 0.453592,
           ("m", "ft"): 3.28084, ("ft", "m"): 0.3048}
EVENTS = ["team sync", "dentist", "lunch with Sam", "budget review", "yoga", "code review", "flight to Rome",
          "1:1 with Priya", "board meeting", "haircut", "sprint planning", "school pickup"]
MONTHS = "January February March April May June July August September October November December".split()
PEOPLE = """Ada Lovelace, Alan Turing, Grace Hopper, Linus Pauling, Marie Curie, Ravi Shankar, Mei Lin,
Jonas Berg, Fatima Zahra, Diego Rivera, Ingrid Holm, Kwame Mensah, Sofia Rossi, Omar Haddad""".replace("\n", " ")
PEOPLE = [p.strip() for p in PEOPLE.split(",")]
TEAMS = ["finance", "platform", "sales", "research", "legal", "design"]

TOOLS = {
    "get_weather": {"description": "Current weather in a city", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}},
    "convert_units": {"description": "Convert a value between units", "properties": {
        "value": {"type": "number"}, "from_unit": {"type": "string", "enum": sorted(UNITS)},
        "to_unit": {"type": "string", "enum": sorted(UNITS)}}},
    "add_event": {"description": "Add an event to the calendar", "properties": {
        "title": {"type": "string"}, "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "time": {"type": "string", "pattern": r"^\d{2}:\d{2}$"}}},
    "find_employee": {"description": "Look up a colleague in the directory", "properties": {
        "name": {"type": "string"}}},
}


def tool_spec(name: str) -> dict:
    """One tool in OpenAI's `tools` format (every parameter required, no others allowed: strict-mode ready)."""
    t = TOOLS[name]
    params = {"type": "object", "properties": t["properties"], "required": list(t["properties"]),
              "additionalProperties": False}
    return {"type": "function", "function": {"name": name, "description": t["description"], "parameters": params}}


def weather(rng: random.Random) -> tuple[str, dict, dict, str]:
    city, unit = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit"])
    q = rng.choice(["What's the weather in {c} in {u}?", "Weather for {c}, please ({u}).",
                    "How warm is it in {c} right now? Use {u}.", "Tell me the {u} temperature in {c}."])
    temp = rng.randint(-5, 30) if unit == "celsius" else rng.randint(23, 86)
    result = {"temperature": temp, "conditions": rng.choice(CONDITIONS)}
    answer = f"It is {temp} degrees {unit} with {result['conditions']} in {city}."
    return q.format(c=city, u=unit), {"city": city, "unit": unit}, result, answer


def convert(rng: random.Random) -> tuple[str, dict, dict, str]:
    src = rng.choice(sorted(u for u in UNITS if u not in ("c", "f")))
    dst, value = UNITS[src], rng.randint(1, 500)
    q = rng.choice(["Convert {v} {s} to {d}.", "How many {d} is {v} {s}?", "{v} {s} in {d}?",
                    "What is {v} {s} in {d}?"])
    out = round(value * FACTORS[(src, dst)], 2)
    answer = f"{value} {UNIT_NAMES[src]} is {out} {UNIT_NAMES[dst]}."
    return (q.format(v=value, s=UNIT_NAMES[src], d=UNIT_NAMES[dst]),
            {"value": value, "from_unit": src, "to_unit": dst}, {"result": out}, answer)


def event(rng: random.Random) -> tuple[str, dict, dict, str]:
    title, month, day = rng.choice(EVENTS), rng.randrange(12), rng.randint(1, 28)
    hour, minute = rng.randint(7, 19), rng.choice([0, 15, 30, 45])
    date, time = f"2027-{month + 1:02d}-{day:02d}", f"{hour:02d}:{minute:02d}"
    q = rng.choice(["Add {t} on {m} {d} at {h}.", "Put {t} in my calendar for {m} {d}, {h}.",
                    "Schedule {t} at {h} on {m} {d}."])
    answer = f"Added {title} on {MONTHS[month]} {day} at {time}."
    return (q.format(t=title, m=MONTHS[month], d=day, h=time), {"title": title, "date": date, "time": time},
            {"status": "created"}, answer)


def employee(rng: random.Random) -> tuple[str, dict, dict, str]:
    name = rng.choice(PEOPLE)
    q = rng.choice(["Who is {n}?", "Find {n} in the directory.", "Which team is {n} on?",
                    "Look up {n} for me."])
    team, room = rng.choice(TEAMS), rng.randint(100, 499)
    answer = f"{name} works in {team}, room {room}."
    return q.format(n=name), {"name": name}, {"team": team, "room": room}, answer


NO_TOOL = [("Hello!", "Hello! How can I help?"), ("Thanks, that's all.", "You're welcome."),
           ("What can you do?", "I can check the weather, convert units, add calendar events and look up colleagues."),
           ("Good morning.", "Good morning! What do you need?")]
MAKERS = {"get_weather": weather, "convert_units": convert, "add_event": event, "find_employee": employee}


def record(rng: random.Random, index: int) -> dict:
    """One conversation: a request, the call, the tool's result and the answer (or a plain reply)."""
    offered = rng.sample(sorted(TOOLS), rng.randint(2, 3))
    if rng.random() < 0.125:
        q, a = rng.choice(NO_TOOL)
        return {"tools": [tool_spec(n) for n in offered],
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    name = rng.choice(offered)
    q, args, result, answer = MAKERS[name](rng)
    call_id = f"call_{index}"
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    return {"tools": [tool_spec(n) for n in offered], "messages": [
        {"role": "user", "content": q},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
        {"role": "assistant", "content": answer}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder")
    parser.add_argument("--train", type=int, default=20000, help="training records")
    parser.add_argument("--val", type=int, default=200, help="validation records")
    args = parser.parse_args()
    rng = random.Random(1)
    train = [record(rng, i) for i in range(args.train)]
    seen = {r["messages"][0]["content"] for r in train}
    rng, val = random.Random(2), []
    while len(val) < args.val:
        r = record(rng, len(val))
        if r["messages"][0]["content"] not in seen or "tool_calls" not in r["messages"][1]:
            val.append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val)):
        with open(args.out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} records to {args.out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()

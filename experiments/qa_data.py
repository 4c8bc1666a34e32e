"""A generated extractive-QA set (SQuAD v1.1 JSON): each context holds three facts of different kinds (who
founded something, where a treaty was signed, when a festival started, which company built something) among
filler sentences, and the question asks for one of them, so the reader has to match the question to its fact.
Contexts run to about 100 - 250 tokens, past a 128-token window; the eval split's answers are names, places,
years and companies the training split never uses.

    python experiments/qa_data.py --out runs/qa_data     # train.json (3,000 questions), dev.json (400)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FACTS = {
    "person": (["Who founded the {thing}?", "Which person founded the {thing}?"], "The {thing} was founded by {x}.",
               ["Ada Lovelace", "Carl Sagan", "Vera Rubin", "Tycho Brahe", "Grace Hopper", "Alan Turing",
                "Marie Curie", "Nikola Tesla", "Rosalind Franklin", "Srinivasa Ramanujan", "Hedy Lamarr",
                "Emmy Noether", "Chien-Shiung Wu", "Mary Anning", "Lise Meitner", "Katherine Johnson"]),
    "place": (["Where was the {thing} signed?", "In which city was the {thing} signed?"],
              "The {thing} was signed in {x}.",
              ["Vienna", "Lisbon", "Oslo", "Quito", "Nairobi", "Hanoi", "Lima", "Accra", "Seoul", "Tunis", "Riga",
               "Dakar", "Bogota", "Perth", "Cusco", "Tbilisi"]),
    "year": (["When did the {thing} start?", "In what year did the {thing} start?"], "The {thing} started in {x}.",
             [str(y) for y in range(1850, 2020, 7)]),
    "company": (["Which company built the {thing}?", "Who built the {thing}?"], "The {thing} was built by {x}.",
                ["Acme Corp", "Globex", "Initech", "Umbrella Labs", "Stark Industries", "Tyrell Systems", "Hooli",
                 "Vandelay Imports", "Aperture Science", "Cyberdyne", "Soylent Works", "Wonka Industries"]),
}
THINGS = {"person": ["observatory", "library", "academy", "museum"], "place": ["treaty", "accord", "charter"],
          "year": ["festival", "exhibition", "tournament"], "company": ["bridge", "tower", "dam", "railway"]}
FILLER = ["The weather was mild that spring.", "Markets opened late on Monday.", "A new road crossed the valley.",
          "Local schools closed for a week.", "Visitors praised the old harbour.", "Trains ran on a reduced timetable.",
          "The council met again in the evening.", "Prices for bread rose slightly.", "Fishing boats stayed in port.",
          "A choir performed in the square.", "The river flooded two fields.", "Reporters waited outside the hall."]


def split_values(rng):
    train, held = {}, {}
    for kind, (_, _, values) in FACTS.items():
        order = rng.permutation(len(values))
        cut = max(2, len(values) // 4)
        held[kind], train[kind] = [values[i] for i in order[:cut]], [values[i] for i in order[cut:]]
    return train, held


def questions(rng, n, values, prefix):
    paragraphs = []
    for i in range(n):
        kinds = list(rng.permutation(list(FACTS))[:3])
        sentences, asked = [], None  # (text with a slot, its value, whether the question asks for it)
        for k, kind in enumerate(kinds):
            thing = THINGS[kind][rng.integers(len(THINGS[kind]))]
            x = values[kind][rng.integers(len(values[kind]))]
            sentences.append((FACTS[kind][1].format(thing=thing, x="\0"), x, k == 0))
            if k == 0:
                asked = (FACTS[kind][0][rng.integers(2)].format(thing=thing), x)
        for _ in range(rng.integers(4, 16)):
            sentences.insert(int(rng.integers(len(sentences) + 1)), (FILLER[rng.integers(len(FILLER))], None, False))
        context, start = "", None
        for text, x, is_asked in sentences:
            context += " " if context else ""
            if x is None:
                context += text
                continue
            before, after = text.split("\0")
            if is_asked:
                start = len(context) + len(before)
            context += before + x + after
        paragraphs.append({"context": context, "qas": [{"id": f"{prefix}{i}", "question": asked[0],
                                                        "answers": [{"text": asked[1], "answer_start": start}]}]})
    return {"version": "1.1", "data": [{"title": "generated", "paragraphs": paragraphs}]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/qa_data")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--dev", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    train_values, dev_values = split_values(rng)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(questions(rng, args.train, train_values, "t")))
    (out / "dev.json").write_text(json.dumps(questions(rng, args.dev, dev_values, "d")))
    print(f"wrote {out / 'train.json'} ({args.train} questions) and {out / 'dev.json'} ({args.dev}, unseen answers)")


if __name__ == "__main__":
    main()

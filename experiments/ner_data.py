"""A generated named-entity set (IOB2, CoNLL format): sentences from templates with people, places and
organisations; the eval split's names are names the training split never shows, so entity F1 measures
whether the tagger reads context and word shape, not a memorised list.

    python experiments/ner_data.py --out runs/ner_data     # train.conll (2,000 sentences), eval.conll (400)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FIRST = ["John", "Mary", "Ahmed", "Li", "Sofia", "Carlos", "Anna", "Tom", "Fatima", "Ivan", "Aiko", "Pedro",
         "Grace", "Omar", "Elena", "Kwame", "Hana", "Lucas", "Priya", "Noah", "Amara", "Yusuf", "Chloe", "Mateo"]
LAST = ["Smith", "Khan", "Wei", "Diaz", "Berg", "Okafor", "Rossi", "Nowak", "Silva", "Tanaka", "Dubois",
        "Mensah", "Ivanova", "Haddad", "Lindqvist", "Moreau", "Kowalski", "Sato", "Nguyen", "Costa"]
PLACES = ["Paris", "New York", "Lagos", "Tokyo", "Lima", "Oslo", "Cape Town", "Delhi", "Cairo", "Berlin",
          "Buenos Aires", "Nairobi", "Seoul", "Madrid", "Kyiv", "Lisbon", "Accra", "Hanoi", "Quito", "Perth"]
ORGS = ["Acme Corp", "the United Nations", "Globex", "Red Cross", "Initech", "the World Bank", "Umbrella Labs",
        "Oxfam", "Stark Industries", "Tyrell Systems", "Wayne Foundation", "Hooli", "Vandelay Imports", "Aperture"]
TEMPLATES = [
    "{PER} flew to {LOC} yesterday .", "{PER} works for {ORG} in {LOC} .", "yesterday {PER} said {LOC} was lovely .",
    "{ORG} opened an office in {LOC} .", "{PER} joined {ORG} last year .", "the team met {PER} near {LOC} .",
    "{LOC} welcomed {PER} on Monday .", "{PER} and {PER} visited {LOC} .", "a spokesperson for {ORG} denied it .",
    "{PER} left {ORG} to move to {LOC} .", "prices in {LOC} rose again , {ORG} reported .",
    "according to {PER} , {ORG} will grow .", "{PER} was born in {LOC} .", "nobody expected {ORG} to win .",
    "we drove from {LOC} to {LOC} .", "{PER} thanked {PER} for the help .", "it rained all week .",
    "{ORG} hired {PER} as director .", "the train to {LOC} was late .", "{PER} called from {LOC} .",
]


def split_names(rng, items, held_out):
    order = rng.permutation(len(items))
    return [items[i] for i in order[held_out:]], [items[i] for i in order[:held_out]]


def sentences(rng, n, first, last, places, orgs):
    out = []
    for _ in range(n):
        words, tags = [], []
        for piece in TEMPLATES[rng.integers(len(TEMPLATES))].split():
            if piece in ("{PER}", "{LOC}", "{ORG}"):
                kind = piece[1:-1]
                if kind == "PER":
                    name = first[rng.integers(len(first))] + ("" if rng.random() < 0.3 else
                                                              " " + last[rng.integers(len(last))])
                else:
                    pool = places if kind == "LOC" else orgs
                    name = pool[rng.integers(len(pool))]
                for i, w in enumerate(name.split()):
                    words.append(w)
                    tags.append(f"{'B' if i == 0 else 'I'}-{kind}")
            else:
                words.append(piece)
                tags.append("O")
        out.append((words, tags))
    return out


def write(path: Path, rows) -> None:
    path.write_text("".join("".join(f"{w} {t}\n" for w, t in zip(*row)) + "\n" for row in rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ner_data")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    pools = [split_names(rng, items, len(items) // 4) for items in (FIRST, LAST, PLACES, ORGS)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "train.conll", sentences(rng, args.train, *(p[0] for p in pools)))
    write(out / "eval.conll", sentences(rng, args.eval, *(p[1] for p in pools)))
    print(f"wrote {out / 'train.conll'} ({args.train} sentences) and {out / 'eval.conll'} ({args.eval}, unseen names)")


if __name__ == "__main__":
    main()

"""Generator of the bundled alignment samples (``ellama_recipes/sample_data/sft/`` and ``.../preference/``).

Not installed code: the package ships the generated files (package data). Everything is authored for this project
from the bundled domain sample (``ellama_recipes/sample_data/domain/``: synthetic products and reviews) and the
templates below, so the output is license-clean (Apache-2.0 like the package) and deterministic (same seed, same
bytes). Regenerate with::

    python tools/make_align_samples.py                 # writes ellama_recipes/sample_data/{sft,preference}/
    python tools/make_align_samples.py --out /tmp/al --per-task 20

Tasks (EcomGPT-style e-commerce instructions, each in the product's language: en, de, fr, es) plus general ones:

- ``classify``: product title -> its category (one of six);
- ``extract``: product description (HTML stripped) -> its attributes as ``key: value`` lines;
- ``title``: category + attributes -> a product title;
- ``summarize``: a product's reviews -> a one-line summary (average rating, review count, the first review's gist);
- ``general``: arithmetic, sorting, unit conversion, capitals, upper-casing (English).

Layout written:

- ``sft/ecommerce.jsonl``: ``{"messages": [{"role": "system"|"user"|"assistant", "content"}, ...], "task", "lang"}``
  (some rows multi-turn, some with a system prompt);
- ``sft/general.jsonl``: ``{"prompt", "response", "task", "lang"}`` (the prompt/response form);
- ``preference/ecommerce.jsonl``: ``{"prompt", "chosen", "rejected", "task", "lang"}`` where ``rejected`` is a
  systematically worse answer (wrong category, missing attributes, a generic title, a summary with the wrong
  rating, an off-topic reply);
- ``preference/general.jsonl``: ``{"messages": [...], "chosen", "rejected", "task", "lang"}`` (wrong results).
"""

from __future__ import annotations

import argparse
import html
import json
import random
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "ellama_recipes" / "sample_data"

CATEGORIES = ["kitchen", "clothing", "home", "electronics", "sports", "beauty"]

PROMPTS = {
    "classify": {
        "en": "Classify the product into one of these categories: {cats}.\nProduct: {title}\nAnswer with the category only.",
        "de": "Ordne das Produkt einer dieser Kategorien zu: {cats}.\nProdukt: {title}\nAntworte nur mit der Kategorie.",
        "fr": "Classe le produit dans l'une de ces catégories : {cats}.\nProduit : {title}\nRéponds uniquement par la catégorie.",
        "es": "Clasifica el producto en una de estas categorías: {cats}.\nProducto: {title}\nResponde solo con la categoría.",
    },
    "extract": {
        "en": "Extract the product attributes from this description as 'key: value' lines.\n{desc}",
        "de": "Extrahiere die Produktattribute aus dieser Beschreibung als Zeilen 'Schlüssel: Wert'.\n{desc}",
        "fr": "Extrais les attributs du produit de cette description sous forme de lignes 'clé : valeur'.\n{desc}",
        "es": "Extrae los atributos del producto de esta descripción como líneas 'clave: valor'.\n{desc}",
    },
    "title": {
        "en": "Write a product title for a {cat} product with these attributes: {attrs}.",
        "de": "Schreibe einen Produkttitel für ein Produkt der Kategorie {cat} mit diesen Attributen: {attrs}.",
        "fr": "Écris un titre de produit pour un produit de la catégorie {cat} avec ces attributs : {attrs}.",
        "es": "Escribe un título de producto para un producto de la categoría {cat} con estos atributos: {attrs}.",
    },
    "summarize": {
        "en": "Summarize these customer reviews of {title} in one sentence.\n{reviews}",
        "de": "Fasse diese Kundenbewertungen zu {title} in einem Satz zusammen.\n{reviews}",
        "fr": "Résume ces avis clients sur {title} en une phrase.\n{reviews}",
        "es": "Resume estas opiniones de clientes sobre {title} en una frase.\n{reviews}",
    },
}
SUMMARY = {
    "en": "Average rating {avg}/5 from {n} reviews; customers say: {gist}",
    "de": "Durchschnittliche Bewertung {avg}/5 aus {n} Bewertungen; Kunden sagen: {gist}",
    "fr": "Note moyenne {avg}/5 sur {n} avis ; les clients disent : {gist}",
    "es": "Valoración media {avg}/5 de {n} opiniones; los clientes dicen: {gist}",
}
GENERIC_TITLE = {"en": "Great product", "de": "Tolles Produkt", "fr": "Super produit", "es": "Gran producto"}
OFF_TOPIC = {
    "en": "I cannot help with that.",
    "de": "Dabei kann ich nicht helfen.",
    "fr": "Je ne peux pas vous aider.",
    "es": "No puedo ayudar con eso.",
}
SYSTEM = {
    "en": "You are a helpful e-commerce assistant.",
    "de": "Du bist ein hilfreicher E-Commerce-Assistent.",
    "fr": "Tu es un assistant e-commerce serviable.",
    "es": "Eres un asistente de comercio electrónico útil.",
}
FOLLOW_UP = {
    "en": ("Thanks. Answer in upper case now.", None),
    "de": ("Danke. Antworte jetzt in Großbuchstaben.", None),
    "fr": ("Merci. Réponds maintenant en majuscules.", None),
    "es": ("Gracias. Responde ahora en mayúsculas.", None),
}
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Egypt": "Cairo", "Chile": "Santiago", "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin",
}
WORDS = ["apple", "river", "candle", "mountain", "zebra", "violin", "garden", "bottle", "orange", "ladder",
         "pencil", "harbor", "meadow", "rocket", "tulip", "window", "basket", "copper", "falcon", "lantern"]


def _strip_html(text: str) -> str:
    text = re.sub(r"<li>\s*<b>[^<]*</b>:[^<]*</li>", " ", text)  # the attribute list would give the answer away
    text = re.sub(r"<[^>]+>", " ", text)
    text = html.unescape(re.sub(r"\s+", " ", text)).strip()
    return re.sub(r"\s*Free shipping on orders over \$\d+!?", "", text)


def _first(text: str, sentences: int = 2) -> str:
    """The first ``sentences`` sentences of a review (keeps prompts short enough for the tiny size's 256 tokens)."""
    parts = [x.strip().rstrip(".") for x in text.split(". ") if x.strip()]
    return ". ".join(parts[:sentences]) + "."


def _attr_lines(attrs: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in sorted(attrs.items()))


def _attr_inline(attrs: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(attrs.items()))


def _ecommerce(products: list[dict], reviews: dict[str, list[dict]], rng: random.Random, per_task: int):
    """(task, lang, prompt, good answer, worse answer) per generated example."""
    out = []
    shuffled = products[:]
    rng.shuffle(shuffled)
    for task in ("classify", "extract", "title", "summarize"):
        pool = [p for p in shuffled if task != "summarize" or len(reviews.get(p["id"], [])) >= 2]
        for p in pool[:per_task]:
            lang = p["lang"]
            tmpl = PROMPTS[task][lang]
            if task == "classify":
                cats = CATEGORIES[:]
                rng.shuffle(cats)
                prompt = tmpl.format(cats=", ".join(cats), title=p["title"])
                good = p["category"]
                bad = rng.choice([c for c in CATEGORIES if c != good])
            elif task == "extract":
                prompt = tmpl.format(desc=_strip_html(p["description"]) + f" Model {p['attributes'].get('model', '')}.")
                good = _attr_lines(p["attributes"])
                keys = sorted(p["attributes"])
                bad = _attr_lines({k: p["attributes"][k] for k in keys[:1]}) if len(keys) > 1 else OFF_TOPIC[lang]
            elif task == "title":
                prompt = tmpl.format(cat=p["category"], attrs=_attr_inline(p["attributes"]))
                good = p["title"]
                bad = GENERIC_TITLE[lang]
            else:
                rs = reviews[p["id"]][:3]
                listed = "\n".join(f"- ({r['rating']}/5) {_first(r['text'])}" for r in rs)
                prompt = tmpl.format(title=p["title"], reviews=listed)
                avg = sum(r["rating"] for r in rs) / len(rs)
                gist = _first(rs[0]["text"], 1)
                good = SUMMARY[lang].format(avg=f"{avg:.1f}", n=len(rs), gist=gist)
                wrong = 5.0 if avg < 3 else 1.0
                bad = SUMMARY[lang].format(avg=f"{wrong:.1f}", n=len(rs), gist=OFF_TOPIC[lang])
            out.append((task, lang, prompt, good, bad))
    return out


def _general(rng: random.Random, n: int):
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            out.append(("arithmetic", f"What is {a} + {b}?", str(a + b), str(a + b + rng.choice([-10, -1, 1, 10]))))
        elif kind == 1:
            ws = rng.sample(WORDS, 4)
            good = ", ".join(sorted(ws))
            bad = ", ".join(sorted(ws, reverse=True))
            out.append(("sorting", f"Sort these words alphabetically: {', '.join(ws)}.", good, bad))
        elif kind == 2:
            km = rng.randint(1, 40)
            out.append(("units", f"How many meters are {km} kilometers?", f"{km} kilometers are {km * 1000} meters.",
                        f"{km} kilometers are {km * 100} meters."))
        elif kind == 3:
            country = rng.choice(sorted(CAPITALS))
            wrong = rng.choice([c for k, c in sorted(CAPITALS.items()) if k != country])
            out.append(("capitals", f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}.",
                        f"The capital of {country} is {wrong}."))
        else:
            ws = " ".join(rng.sample(WORDS, 3))
            out.append(("upper", f"Rewrite in upper case: {ws}", ws.upper(), ws))
    return out


def generate(out: Path, *, seed: int = 1234, per_task: int = 60, general: int = 120) -> dict[str, int]:
    domain = ROOT / "domain"
    products = [json.loads(line) for line in open(domain / "products.jsonl", encoding="utf-8")]
    reviews: dict[str, list[dict]] = defaultdict(list)
    for line in open(domain / "reviews.jsonl", encoding="utf-8"):
        r = json.loads(line)
        reviews[r["product_id"]].append(r)
    counts = {}

    def write(path: Path, rows: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        counts[str(path.relative_to(out))] = len(rows)

    # SFT and preference draw different products (different seeds) so the two stages see different prompts.
    rng = random.Random(seed)
    sft = []
    for i, (task, lang, prompt, good, _) in enumerate(_ecommerce(products, reviews, rng, per_task)):
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": good}]
        if i % 4 == 1:
            msgs.insert(0, {"role": "system", "content": SYSTEM[lang]})
        if i % 10 == 3 and task in ("classify", "title"):
            msgs += [{"role": "user", "content": FOLLOW_UP[lang][0]}, {"role": "assistant", "content": good.upper()}]
        sft.append({"messages": msgs, "task": task, "lang": lang})
    write(out / "sft" / "ecommerce.jsonl", sft)
    write(out / "sft" / "general.jsonl", [
        {"prompt": p, "response": g, "task": t, "lang": "en"} for t, p, g, _ in _general(rng, general)
    ])

    rng = random.Random(seed + 1)
    pref = [
        {"prompt": prompt, "chosen": good, "rejected": bad, "task": task, "lang": lang}
        for task, lang, prompt, good, bad in _ecommerce(products, reviews, rng, per_task * 2 // 3)
    ]
    write(out / "preference" / "ecommerce.jsonl", pref)
    write(out / "preference" / "general.jsonl", [
        {"messages": [{"role": "user", "content": p}], "chosen": g, "rejected": b, "task": t, "lang": "en"}
        for t, p, g, b in _general(rng, general * 2 // 3)
    ])
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--per-task", type=int, default=60, help="SFT examples per e-commerce task (preference: 2/3)")
    ap.add_argument("--general", type=int, default=120, help="general SFT examples (preference: 2/3)")
    a = ap.parse_args(argv)
    for name, n in generate(a.out, seed=a.seed, per_task=a.per_task, general=a.general).items():
        print(f"{n:6d}  {a.out / name}")


if __name__ == "__main__":
    main()

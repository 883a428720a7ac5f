"""A planted mining test: free-prose e-commerce documents hidden among general documents, in four languages.

The domain classifier of ``ellama data classify`` is trained on catalog records (products, reviews, buying
guides). What it is *for* is finding domain prose in open text: forum posts about an order, buying notes, shipping
and returns talk. This generator writes such a pool, with its own sentence templates (none of them is a template of
``tools/make_sample.py``; they share only the product vocabulary), plus general documents from the sample's
general-text generator (another seed) and "hard" general documents that use shop-adjacent words outside commerce
(the weekly market, the post office delivering letters, the price of grain in history).

Seeded and deterministic. Used by ``tests/test_mining.py`` and ``benchmarks/bench_mining.py``::

    python tools/make_planted.py --out /tmp/pool --general 4000 --planted 200
    # writes /tmp/pool/pool.jsonl ({"text", "lang"}) and /tmp/pool/labels.jsonl ({"planted": bool}, same order)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path


def _sample_module():
    name = "ellama_make_sample"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "make_sample.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


S = _sample_module()
LANGS = ("en", "de", "fr", "es")
LANG_WEIGHTS = (0.5, 0.17, 0.17, 0.16)

# Free prose about buying things online: openers, bodies (order, delivery, returns, comparison), closers.
PLANTED = {
    "en": {
        "open": [
            "Quick update on the {noun} I mentioned last month.",
            "Some notes for anyone thinking about getting a {noun}.",
            "I finally replaced my old {noun} and wanted to share how it went.",
            "Long post, sorry, but the {noun} saga is over.",
            "A friend asked me which {noun} to buy, so here is what I learned.",
        ],
        "body": [
            "I paid {price} euros after a coupon, which felt fair compared with the shop down the road.",
            "The parcel was stuck at the depot for {days} days and the tracking page never changed.",
            "When it arrived the box was dented, so I opened a return request the same evening.",
            "The refund showed up on my card a week after the courier picked the package up.",
            "I went back and forth between two sellers; one had cheaper postage, the other a longer guarantee.",
            "Their support chat sent me a prepaid label without asking many questions.",
            "I kept the receipt and the original packaging in case I need to send it back.",
            "The listing said {attr_v}, and that turned out to be accurate.",
            "Checkout was painless, but the estimated delivery slipped twice.",
            "Exchanging it for the {adj} version cost me nothing except a trip to the pickup point.",
            "I read about forty customer opinions before I pressed the order button.",
            "Next time I will wait for the seasonal sale, the price dropped right after I bought mine.",
        ],
        "close": [
            "Would I order from them again? Probably, if the price is right.",
            "Overall a decent purchase, just check the return window before you buy.",
            "Happy with it now, but the shipping part tested my patience.",
            "If you buy one, keep an eye on the tracking number.",
        ],
    },
    "de": {
        "open": [
            "Kurzer Nachtrag zu der {noun}, die ich letzten Monat erwähnt habe.",
            "Ein paar Notizen für alle, die sich eine {noun} zulegen wollen.",
            "Ich habe endlich meine alte {noun} ersetzt und will kurz berichten.",
            "Eine Freundin fragte mich, welche {noun} sie kaufen soll, hier meine Erfahrungen.",
        ],
        "body": [
            "Mit Gutschein habe ich {price} Euro bezahlt, günstiger als im Laden um die Ecke.",
            "Das Paket lag {days} Tage im Verteilzentrum und die Sendungsverfolgung zeigte nichts Neues.",
            "Der Karton kam eingedrückt an, also habe ich noch am selben Abend eine Rücksendung angemeldet.",
            "Die Erstattung war eine Woche nach der Abholung durch den Paketdienst auf meinem Konto.",
            "Ich habe zwischen zwei Händlern geschwankt: einer mit billigerem Versand, einer mit längerer Garantie.",
            "Der Kundenservice hat mir ohne viele Fragen ein Rücksendeetikett geschickt.",
            "Quittung und Originalverpackung hebe ich auf, falls ich sie zurückschicken muss.",
            "Bezahlt habe ich per Rechnung, die Bestellung war in zwei Minuten erledigt.",
            "Der Umtausch gegen die andere Farbe kostete nur den Weg zur Packstation.",
            "Nach dem Kauf fiel der Preis im Sommerschlussverkauf noch einmal deutlich.",
        ],
        "close": [
            "Würde ich dort wieder bestellen? Wahrscheinlich, wenn der Preis stimmt.",
            "Insgesamt ein ordentlicher Kauf, aber prüft vorher die Rückgabefrist.",
            "Jetzt bin ich zufrieden, nur der Versand hat Nerven gekostet.",
        ],
    },
    "fr": {
        "open": [
            "Petit retour sur le {noun} dont je parlais le mois dernier.",
            "Quelques notes pour ceux qui hésitent à acheter un {noun}.",
            "J'ai enfin remplacé mon vieux {noun}, voici comment ça s'est passé.",
            "Une amie m'a demandé quel {noun} choisir, alors voici mon expérience.",
        ],
        "body": [
            "Avec un code promo je l'ai payé {price} euros, moins cher qu'en magasin.",
            "Le colis est resté {days} jours au dépôt et le suivi n'a jamais bougé.",
            "Le carton est arrivé abîmé, j'ai donc demandé un retour le soir même.",
            "Le remboursement est arrivé une semaine après l'enlèvement par le transporteur.",
            "J'ai hésité entre deux vendeurs : l'un avec des frais de port plus bas, l'autre avec une garantie plus longue.",
            "Le service client m'a envoyé une étiquette de retour prépayée sans poser de questions.",
            "Je garde le ticket de caisse et l'emballage d'origine au cas où je devrais le renvoyer.",
            "La commande a été passée en deux minutes, mais la date de livraison a glissé deux fois.",
            "L'échange contre l'autre coloris ne m'a coûté qu'un passage au point relais.",
            "Juste après mon achat, le prix a encore baissé pendant les soldes.",
        ],
        "close": [
            "Est-ce que je commanderais encore chez eux ? Sans doute, si le prix est bon.",
            "Bon achat dans l'ensemble, vérifiez juste le délai de rétractation.",
            "Content maintenant, mais la livraison a mis ma patience à l'épreuve.",
        ],
    },
    "es": {
        "open": [
            "Una actualización rápida sobre el {noun} que mencioné el mes pasado.",
            "Unas notas para quien esté pensando en comprar un {noun}.",
            "Por fin cambié mi viejo {noun} y quería contar cómo fue.",
            "Una amiga me preguntó qué {noun} comprar, así que aquí va mi experiencia.",
        ],
        "body": [
            "Con un cupón pagué {price} euros, menos que en la tienda de mi barrio.",
            "El paquete se quedó {days} días en el almacén y el seguimiento no cambiaba.",
            "La caja llegó abollada, así que pedí la devolución esa misma noche.",
            "El reembolso llegó a mi tarjeta una semana después de que el mensajero recogiera el paquete.",
            "Dudé entre dos vendedores: uno con envío más barato y otro con una garantía más larga.",
            "El servicio de atención me mandó una etiqueta de devolución prepagada sin hacer preguntas.",
            "Guardo el tique y el embalaje original por si tengo que devolverlo.",
            "El pedido me llevó dos minutos, pero la fecha de entrega se retrasó dos veces.",
            "Cambiarlo por el otro color solo me costó ir al punto de recogida.",
            "Justo después de comprarlo, el precio bajó todavía más en las rebajas.",
        ],
        "close": [
            "¿Volvería a pedirles algo? Seguramente, si el precio acompaña.",
            "En general una buena compra, solo revisad el plazo de devolución.",
            "Ahora estoy contento, pero el envío puso a prueba mi paciencia.",
        ],
    },
}

# General documents that use shop-adjacent words outside commerce (hard negatives).
HARD = {
    "en": [
        "The weekly market in {place} has been held in the same square since the {century} century.",
        "Records show the price of grain doubled during the famine of {year}.",
        "The post office in {place} delivered letters by boat until the bridge was built.",
        "Farmers brought their cattle to the autumn fair, where prizes were awarded for the best animals.",
        "The old customs house by the harbour is now a small museum about the history of trade.",
        "Merchants once travelled for weeks to sell salt and wool in {place}.",
        "The village shop closed in {year}, and the building became a community hall.",
        "Volunteers deliver hot meals to elderly neighbours every Thursday.",
    ],
    "de": [
        "Der Wochenmarkt in {place} findet seit Jahrhunderten auf demselben Platz statt.",
        "Im Jahr {year} verdoppelte sich der Getreidepreis während der Hungersnot.",
        "Die Post brachte die Briefe bis zum Bau der Brücke mit dem Boot zu {place}.",
        "Kaufleute reisten früher wochenlang, um Salz und Wolle zu verkaufen.",
    ],
    "fr": [
        "Le marché hebdomadaire de {place} se tient sur la même place depuis des siècles.",
        "En {year}, le prix du blé a doublé pendant la famine.",
        "Avant le pont, la poste livrait les lettres en bateau jusqu'à {place}.",
        "Autrefois les marchands voyageaient des semaines pour vendre du sel et de la laine.",
    ],
    "es": [
        "El mercado semanal de {place} se celebra en la misma plaza desde hace siglos.",
        "En {year}, el precio del trigo se duplicó durante la hambruna.",
        "Antes del puente, el correo llevaba las cartas en barca hasta {place}.",
        "Los comerciantes viajaban semanas para vender sal y lana.",
    ],
}


def _noun(rng: random.Random, lang: str) -> tuple[str, dict]:
    cat = rng.choice(sorted(S.CATEGORIES))
    spec = S.CATEGORIES[cat]
    k = rng.randrange(len(spec["nouns"]["en"]))
    return spec["nouns"][lang][k], spec


def planted_doc(rng: random.Random, lang: str) -> str:
    """One free-prose e-commerce document (a forum post / buying note) in ``lang``."""
    spec = PLANTED[lang]
    noun, cat = _noun(rng, lang)
    attr_k = rng.choice(sorted(cat["attrs"]))
    slots = {"noun": noun, "attr_v": rng.choice(cat["attrs"][attr_k]), "adj": rng.choice(S.ADJ[lang]),
             "price": str(rng.choice([19, 35, 60, 89, 120, 240])), "days": str(rng.randint(2, 9))}
    sents = [rng.choice(spec["open"])] + rng.sample(spec["body"], k=rng.randint(2, 4)) + [rng.choice(spec["close"])]
    sents = [s.format(**slots) for s in sents]
    # free prose wanders: two sentences of everyday (general) text inside the post
    aside = [x.rstrip(".") + "." for x in _general(rng, lang).split(". ")]
    for x in rng.sample(aside, k=min(2, len(aside))):
        sents.insert(rng.randrange(1, len(sents)), x)
    return " ".join(sents)


def _general(rng: random.Random, lang: str) -> str:
    return S._general_en(rng) if lang == "en" else S._general_other(rng, lang)


def hard_doc(rng: random.Random, lang: str) -> str:
    """A general document (sample generator) with two shop-adjacent sentences spliced in."""
    sents = _general(rng, lang).split(". ")
    place = (S.GEN_SLOTS["en"] if lang == "en" else S.GEN_TOPICS_OTHER[lang]["slots"])["place"]
    for s in rng.sample(HARD[lang], k=2):
        fill = s.format(place=rng.choice(place), year=rng.randint(1700, 1950),
                        century=rng.choice(S.GEN_SLOTS["en"]["century"]))
        sents.insert(rng.randrange(len(sents) + 1), fill.rstrip("."))
    return ". ".join(x.rstrip(".") for x in sents) + "."


def generate_pool(n_general: int = 4000, n_planted: int = 200, seed: int = 7, hard_share: float = 0.08):
    """Yield ``(doc, planted)`` in a seeded shuffled order: ``n_general`` general documents (``hard_share`` of them
    hard negatives) and ``n_planted`` planted documents, each ``{"text", "lang"}``. Streams (constant memory) for
    large pools: planted positions are drawn up front as a set of indices."""
    rng = random.Random(seed)
    total = n_general + n_planted
    planted_at = set(rng.sample(range(total), n_planted)) if n_planted else set()
    for i in range(total):
        lang = rng.choices(LANGS, weights=LANG_WEIGHTS)[0]
        if i in planted_at:
            yield {"text": planted_doc(rng, lang), "lang": lang}, True
        elif rng.random() < hard_share:
            yield {"text": hard_doc(rng, lang), "lang": lang}, False
        else:
            yield {"text": _general(rng, lang), "lang": lang}, False


def write_pool(out: Path, n_general: int = 4000, n_planted: int = 200, seed: int = 7) -> tuple[Path, Path]:
    """Write ``out/pool.jsonl`` and ``out/labels.jsonl``; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    pool, labels = out / "pool.jsonl", out / "labels.jsonl"
    with open(pool, "w", encoding="utf-8") as fp, open(labels, "w", encoding="utf-8") as fl:
        for doc, planted in generate_pool(n_general, n_planted, seed):
            fp.write(json.dumps(doc, ensure_ascii=False) + "\n")
            fl.write(json.dumps({"planted": planted}) + "\n")
    return pool, labels


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a planted mining pool (general + hidden e-commerce prose).")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--general", type=int, default=4000)
    ap.add_argument("--planted", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    pool, labels = write_pool(args.out, args.general, args.planted, args.seed)
    print(f"wrote {pool} and {labels}: {args.general} general + {args.planted} planted documents")


if __name__ == "__main__":
    main()

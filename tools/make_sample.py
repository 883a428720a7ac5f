"""Generator of the bundled sample data (``ellama_recipes/sample_data/``). Not installed: the package ships the
generated files (package data) and finds them with ``ellama_recipes.data.bundled.sample_dir()``.

Everything here is authored for this project (word lists and sentence templates below), so the output is
license-clean (Apache-2.0 like the package). The output is deterministic: the same seed gives byte-identical
files. Regenerate with::

    python tools/make_sample.py            # writes ellama_recipes/sample_data/
    python tools/make_sample.py --out /tmp/s --scale 2

Layout written:

- ``domain/products.jsonl``  ``{"type":"product","id","title","category","attributes":{k:v},"description","lang"}``
- ``domain/reviews.jsonl``   ``{"type":"review","product_id","rating","text","lang"}``
- ``domain/articles.jsonl``  ``{"type":"article","product_ids":[...],"text","lang"}``
- ``general/general_<lang>.jsonl`` ``{"text","lang"}`` (English, German, French, Spanish; some lines carry no
  ``lang`` so language identification has work to do; a few general documents talk about shopping so the domain
  classifier has something to mine)
- ``bad/domain_bad.jsonl`` and ``bad/general_bad.jsonl``: every bad-input kind the pipeline must account for
  (malformed JSON, missing fields, wrong types, invalid UTF-8, empty text, duplicates). Not part of the clean sample.

The domain sample deliberately contains what real feeds contain: HTML markup and shop boilerplate in descriptions,
exact duplicate reviews and near-duplicate re-posts, so ``ellama data clean`` has something to count.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LANGS = ("en", "de", "fr", "es")

# ---------------------------------------------------------------------------------------------------------------------
# Product vocabulary. Each category: noun per language, attribute keys and value pools, feature phrases per language.
# ---------------------------------------------------------------------------------------------------------------------
BRANDS = [
    "Aurivo", "Brightwell", "Calder", "Dunmore", "Eskira", "Falko", "Gryphon", "Halvard", "Istra", "Juniper & Co",
    "Kestrel", "Lumora", "Marisol", "Nordvik", "Orla", "Pellion", "Quillon", "Rivetta", "Solvang", "Tamsin",
    "Ulmera", "Vantor", "Wrenfield", "Xylo", "Yardley Works", "Zephyrine",
]

CATEGORIES = {
    "kitchen": {
        "nouns": {
            "en": ["blender", "kettle", "chef's knife", "frying pan", "coffee grinder", "toaster", "rice cooker", "stand mixer"],
            "de": ["Standmixer", "Wasserkocher", "Kochmesser", "Bratpfanne", "Kaffeemühle", "Toaster", "Reiskocher", "Küchenmaschine"],
            "fr": ["mixeur", "bouilloire", "couteau de chef", "poêle", "moulin à café", "grille-pain", "cuiseur à riz", "robot pâtissier"],
            "es": ["batidora", "hervidor", "cuchillo de chef", "sartén", "molinillo de café", "tostadora", "arrocera", "amasadora"],
        },
        "attrs": {"color": ["black", "silver", "red", "white", "copper"], "material": ["stainless steel", "aluminium", "ceramic", "cast iron", "glass"],
                  "power": ["600 W", "900 W", "1200 W", "1500 W", "2000 W"], "capacity": ["0.8 L", "1.2 L", "1.7 L", "2 L", "5 L"]},
    },
    "electronics": {
        "nouns": {
            "en": ["wireless headphones", "bluetooth speaker", "smartwatch", "e-reader", "power bank", "webcam", "USB-C hub", "action camera"],
            "de": ["kabellose Kopfhörer", "Bluetooth-Lautsprecher", "Smartwatch", "E-Reader", "Powerbank", "Webcam", "USB-C-Hub", "Actionkamera"],
            "fr": ["casque sans fil", "enceinte bluetooth", "montre connectée", "liseuse", "batterie externe", "webcam", "hub USB-C", "caméra d'action"],
            "es": ["auriculares inalámbricos", "altavoz bluetooth", "reloj inteligente", "lector electrónico", "batería externa", "cámara web", "concentrador USB-C", "cámara deportiva"],
        },
        "attrs": {"color": ["black", "graphite", "blue", "white", "sand"], "battery": ["10 h", "20 h", "30 h", "45 h", "3 days"],
                  "connectivity": ["Bluetooth 5.3", "Wi-Fi 6", "USB-C", "NFC", "Bluetooth 5.0"], "weight": ["45 g", "120 g", "230 g", "310 g", "480 g"]},
    },
    "clothing": {
        "nouns": {
            "en": ["rain jacket", "wool sweater", "running shoes", "linen shirt", "hiking boots", "denim jeans", "down vest", "cotton t-shirt"],
            "de": ["Regenjacke", "Wollpullover", "Laufschuhe", "Leinenhemd", "Wanderschuhe", "Jeans", "Daunenweste", "Baumwoll-T-Shirt"],
            "fr": ["veste de pluie", "pull en laine", "chaussures de course", "chemise en lin", "chaussures de randonnée", "jean", "doudoune sans manches", "t-shirt en coton"],
            "es": ["chaqueta impermeable", "jersey de lana", "zapatillas de correr", "camisa de lino", "botas de montaña", "vaqueros", "chaleco de plumas", "camiseta de algodón"],
        },
        "attrs": {"color": ["navy", "olive", "charcoal", "red", "beige"], "size": ["XS", "S", "M", "L", "XL"],
                  "material": ["merino wool", "recycled polyester", "organic cotton", "linen", "nylon"], "fit": ["regular", "slim", "relaxed", "athletic"]},
    },
    "home": {
        "nouns": {
            "en": ["desk lamp", "throw blanket", "office chair", "bookshelf", "air purifier", "wall clock", "storage basket", "duvet"],
            "de": ["Schreibtischlampe", "Kuscheldecke", "Bürostuhl", "Bücherregal", "Luftreiniger", "Wanduhr", "Aufbewahrungskorb", "Bettdecke"],
            "fr": ["lampe de bureau", "plaid", "chaise de bureau", "bibliothèque", "purificateur d'air", "horloge murale", "panier de rangement", "couette"],
            "es": ["lámpara de escritorio", "manta", "silla de oficina", "estantería", "purificador de aire", "reloj de pared", "cesta de almacenaje", "edredón"],
        },
        "attrs": {"color": ["oak", "walnut", "white", "grey", "black"], "dimensions": ["30 x 20 cm", "80 x 40 cm", "120 x 60 cm", "200 x 150 cm"],
                  "material": ["oak wood", "bamboo", "steel", "wool blend", "rattan"], "warranty": ["1 year", "2 years", "3 years", "5 years"]},
    },
    "sports": {
        "nouns": {
            "en": ["yoga mat", "road bike helmet", "tennis racket", "dumbbell set", "camping tent", "water bottle", "trekking poles", "sleeping bag"],
            "de": ["Yogamatte", "Fahrradhelm", "Tennisschläger", "Hantelset", "Campingzelt", "Trinkflasche", "Trekkingstöcke", "Schlafsack"],
            "fr": ["tapis de yoga", "casque de vélo", "raquette de tennis", "set d'haltères", "tente de camping", "gourde", "bâtons de randonnée", "sac de couchage"],
            "es": ["esterilla de yoga", "casco de bicicleta", "raqueta de tenis", "juego de mancuernas", "tienda de campaña", "botella de agua", "bastones de trekking", "saco de dormir"],
        },
        "attrs": {"color": ["green", "orange", "black", "purple", "teal"], "weight": ["300 g", "850 g", "1.2 kg", "2.5 kg", "10 kg"],
                  "material": ["TPE", "carbon fibre", "aluminium", "ripstop nylon", "natural rubber"], "season": ["3-season", "4-season", "summer", "all year"]},
    },
    "beauty": {
        "nouns": {
            "en": ["face cream", "hair dryer", "electric toothbrush", "shampoo", "sunscreen", "beard trimmer", "perfume", "lip balm"],
            "de": ["Gesichtscreme", "Haartrockner", "elektrische Zahnbürste", "Shampoo", "Sonnencreme", "Bartschneider", "Parfüm", "Lippenbalsam"],
            "fr": ["crème visage", "sèche-cheveux", "brosse à dents électrique", "shampooing", "crème solaire", "tondeuse à barbe", "parfum", "baume à lèvres"],
            "es": ["crema facial", "secador de pelo", "cepillo de dientes eléctrico", "champú", "protector solar", "recortadora de barba", "perfume", "bálsamo labial"],
        },
        "attrs": {"volume": ["15 ml", "50 ml", "100 ml", "250 ml", "500 ml"], "skin_type": ["all", "dry", "oily", "sensitive"],
                  "scent": ["unscented", "citrus", "lavender", "sandalwood", "mint"], "power": ["n/a", "1800 W", "2200 W", "rechargeable"]},
    },
}

ADJ = {
    "en": ["compact", "lightweight", "durable", "premium", "everyday", "quiet", "foldable", "ergonomic", "classic", "modern"],
    "de": ["kompakte", "leichte", "robuste", "hochwertige", "alltagstaugliche", "leise", "faltbare", "ergonomische", "klassische", "moderne"],
    "fr": ["compact", "léger", "robuste", "haut de gamme", "polyvalent", "silencieux", "pliable", "ergonomique", "classique", "moderne"],
    "es": ["compacto", "ligero", "resistente", "prémium", "práctico", "silencioso", "plegable", "ergonómico", "clásico", "moderno"],
}

DESC_SENTENCES = {
    "en": [
        "The {adj} {noun} from {brand} is made of {material} and built for daily use.",
        "It weighs less than you would expect and fits easily into a drawer or a backpack.",
        "Customers choose it for its {attr_k} of {attr_v}, which is rare in this price range.",
        "Cleaning takes a minute: wipe it with a damp cloth and let it dry.",
        "Every unit is tested before shipping and comes with a {warranty} warranty.",
        "The package includes the {noun}, a quick start guide and a storage pouch.",
        "Compared with the previous model, the new version is {pct} percent more efficient.",
        "Designed in {city}, it combines a clean look with solid engineering.",
        "The {attr_k} is {attr_v}, so it suits both beginners and experienced users.",
        "Replacement parts are available for at least {years} years after purchase.",
        "A textured grip and rounded edges make it comfortable to hold for long periods.",
        "It is available in {n_colors} colors and ships in plastic-free packaging.",
    ],
    "de": [
        "Die {adj} {noun} von {brand} besteht aus {material} und ist für den täglichen Einsatz gebaut.",
        "Sie wiegt weniger als erwartet und passt problemlos in eine Schublade oder einen Rucksack.",
        "Kunden schätzen besonders die Eigenschaft {attr_k} mit {attr_v}, selten in dieser Preisklasse.",
        "Die Reinigung dauert nur eine Minute: mit einem feuchten Tuch abwischen und trocknen lassen.",
        "Jedes Gerät wird vor dem Versand geprüft und hat {warranty} Garantie.",
        "Im Lieferumfang sind die {noun}, eine Kurzanleitung und eine Aufbewahrungstasche enthalten.",
        "Im Vergleich zum Vorgängermodell ist die neue Version {pct} Prozent effizienter.",
        "Entworfen in {city}, verbindet sie schlichtes Design mit solider Technik.",
        "Ersatzteile sind mindestens {years} Jahre nach dem Kauf erhältlich.",
        "Sie ist in {n_colors} Farben erhältlich und wird plastikfrei verpackt.",
    ],
    "fr": [
        "Le {noun} {adj} de {brand} est fabriqué en {material} et conçu pour un usage quotidien.",
        "Il pèse moins qu'on ne le pense et se range facilement dans un tiroir ou un sac à dos.",
        "Les clients apprécient sa caractéristique {attr_k} de {attr_v}, rare dans cette gamme de prix.",
        "Le nettoyage prend une minute : essuyez-le avec un chiffon humide et laissez sécher.",
        "Chaque appareil est testé avant l'expédition et bénéficie d'une garantie de {warranty}.",
        "Le colis contient le {noun}, un guide de démarrage rapide et une housse de rangement.",
        "Par rapport au modèle précédent, la nouvelle version est {pct} pour cent plus efficace.",
        "Conçu à {city}, il associe une allure sobre à une fabrication solide.",
        "Les pièces de rechange restent disponibles pendant au moins {years} ans après l'achat.",
        "Il existe en {n_colors} couleurs et il est livré dans un emballage sans plastique.",
    ],
    "es": [
        "El {noun} {adj} de {brand} está hecho de {material} y pensado para el uso diario.",
        "Pesa menos de lo que parece y cabe fácilmente en un cajón o en una mochila.",
        "Los clientes valoran su característica {attr_k} de {attr_v}, poco común en este rango de precios.",
        "La limpieza lleva un minuto: pásale un paño húmedo y déjalo secar.",
        "Cada unidad se prueba antes del envío y tiene una garantía de {warranty}.",
        "El paquete incluye el {noun}, una guía de inicio rápido y una funda de almacenaje.",
        "Frente al modelo anterior, la nueva versión es un {pct} por ciento más eficiente.",
        "Diseñado en {city}, combina un aspecto limpio con una construcción sólida.",
        "Hay piezas de repuesto durante al menos {years} años después de la compra.",
        "Está disponible en {n_colors} colores y se envía en un embalaje sin plástico.",
    ],
}

CITIES = ["Lisbon", "Oslo", "Kyoto", "Montreal", "Porto", "Lyon", "Bremen", "Valencia", "Tallinn", "Cork", "Ghent", "Turin"]

BOILERPLATE = [
    "Free shipping on orders over $50!",
    "Click here to buy now.",
    "Add to cart | Add to wishlist | Share",
    "© 2026 All rights reserved.",
    "Subscribe to our newsletter for 10% off your first order.",
]

REVIEW_PHRASES = {
    "en": {
        5: ["Absolutely love this {noun}.", "Best purchase I made this year.", "Exceeded my expectations in every way.", "Works perfectly, highly recommended."],
        4: ["Very good {noun} for the price.", "Solid product with one small flaw.", "Happy with it overall.", "Does the job well."],
        3: ["It is okay, nothing special.", "Average quality, decent value.", "Mixed feelings about this {noun}.", "Fine for occasional use."],
        2: ["Disappointed with the build quality.", "Stopped working properly after a month.", "Not worth the money in my opinion.", "Expected more from {brand}."],
        1: ["Broke on the second day.", "Terrible experience, returned it.", "Do not buy this {noun}.", "Arrived damaged and support never answered."],
        "detail": [
            "I use it {freq} and the {attr_k} of {attr_v} is exactly what the listing says.",
            "Delivery took {days} days and the box was well padded.",
            "My {relative} borrowed it and wants one too.",
            "The instructions could be clearer, but setup took only {minutes} minutes.",
            "After {weeks} weeks it still looks new.",
            "It is a bit louder than my old one.",
            "The color is slightly darker than in the photos.",
            "Customer service replied within {hours} hours when I had a question.",
            "For {price} dollars I did not expect this level of quality.",
            "I compared it with two other brands before choosing {brand}.",
        ],
    },
    "de": {
        5: ["Ich liebe diese {noun}.", "Der beste Kauf dieses Jahres.", "Hat meine Erwartungen übertroffen.", "Funktioniert einwandfrei, klare Empfehlung."],
        4: ["Sehr gut für den Preis.", "Solides Produkt mit einer kleinen Schwäche.", "Insgesamt zufrieden.", "Erfüllt ihren Zweck gut."],
        3: ["Ganz okay, nichts Besonderes.", "Durchschnittliche Qualität.", "Gemischte Gefühle.", "Für gelegentliche Nutzung in Ordnung."],
        2: ["Die Verarbeitung enttäuscht.", "Nach einem Monat gab es Probleme.", "Das Geld nicht wert.", "Von {brand} hätte ich mehr erwartet."],
        1: ["Am zweiten Tag kaputt.", "Schlechte Erfahrung, zurückgeschickt.", "Finger weg von diesem Produkt.", "Beschädigt angekommen, der Support meldet sich nicht."],
        "detail": [
            "Ich benutze sie {freq_de} und die Angabe {attr_k} mit {attr_v} stimmt.",
            "Die Lieferung dauerte {days} Tage und der Karton war gut gepolstert.",
            "Nach {weeks} Wochen sieht sie noch aus wie neu.",
            "Die Anleitung könnte klarer sein, der Aufbau dauerte aber nur {minutes} Minuten.",
            "Der Kundendienst hat innerhalb von {hours} Stunden geantwortet.",
            "Ich habe zwei andere Marken verglichen, bevor ich mich für {brand} entschieden habe.",
        ],
    },
    "fr": {
        5: ["J'adore ce produit.", "Mon meilleur achat de l'année.", "Il a dépassé mes attentes.", "Fonctionne parfaitement, je recommande."],
        4: ["Très bon rapport qualité-prix.", "Produit solide avec un petit défaut.", "Globalement satisfait.", "Fait bien le travail."],
        3: ["Correct, sans plus.", "Qualité moyenne.", "Avis partagé.", "Suffisant pour un usage occasionnel."],
        2: ["Finition décevante.", "Des problèmes après un mois.", "Ne vaut pas son prix.", "J'attendais mieux de {brand}."],
        1: ["Cassé au bout de deux jours.", "Mauvaise expérience, renvoyé.", "À éviter.", "Arrivé abîmé et le service client ne répond pas."],
        "detail": [
            "Je l'utilise {freq_fr} et la caractéristique {attr_k} de {attr_v} correspond à l'annonce.",
            "La livraison a pris {days} jours et le carton était bien protégé.",
            "Après {weeks} semaines il paraît encore neuf.",
            "La notice pourrait être plus claire, mais l'installation a pris {minutes} minutes.",
            "Le service client a répondu en {hours} heures.",
            "J'ai comparé deux autres marques avant de choisir {brand}.",
        ],
    },
    "es": {
        5: ["Me encanta este producto.", "La mejor compra del año.", "Superó mis expectativas.", "Funciona perfectamente, lo recomiendo."],
        4: ["Muy bueno por el precio.", "Producto sólido con un pequeño fallo.", "En general estoy contento.", "Cumple bien su función."],
        3: ["Está bien, nada especial.", "Calidad media.", "Sentimientos encontrados.", "Vale para un uso ocasional."],
        2: ["El acabado decepciona.", "Problemas al cabo de un mes.", "No vale lo que cuesta.", "Esperaba más de {brand}."],
        1: ["Se rompió al segundo día.", "Mala experiencia, lo devolví.", "No lo compres.", "Llegó dañado y el soporte no contesta."],
        "detail": [
            "Lo uso {freq_es} y la característica {attr_k} de {attr_v} es tal como dice el anuncio.",
            "El envío tardó {days} días y la caja venía bien protegida.",
            "Después de {weeks} semanas sigue como nuevo.",
            "Las instrucciones podrían ser más claras, pero el montaje llevó {minutes} minutos.",
            "Atención al cliente respondió en {hours} horas.",
            "Comparé otras dos marcas antes de elegir {brand}.",
        ],
    },
}
FREQ = {"en": ["every day", "twice a week", "on weekends", "every morning"], "de": ["jeden Tag", "zweimal pro Woche", "am Wochenende"],
        "fr": ["tous les jours", "deux fois par semaine", "le week-end"], "es": ["todos los días", "dos veces por semana", "los fines de semana"]}
RELATIVES = ["sister", "neighbour", "father", "colleague", "roommate", "grandmother"]

ARTICLE_SENTENCES = {
    "en": {
        "title": ["Buying guide: choosing a {cat_noun} in 2026", "{n} {cat_noun}s compared", "How we tested {cat_noun}s this season",
                  "The {cat_noun} that is right for you"],
        "intro": ["We spent {weeks} weeks testing products side by side in a real home.", "Prices range widely, so we focused on value for money.",
                  "Our testers looked at build quality, ease of use and long-term durability."],
        "product": ["The {title} stands out for its {attr_k} of {attr_v}.", "If budget matters, the {title} is hard to beat.",
                    "The {title} impressed our testers, although the {attr_k} ({attr_v}) will not suit everyone.",
                    "Readers rated the {title} {rating} out of 5 on average."],
        "outro": ["In the end the right choice depends on how often you will use it.", "Check the warranty terms before you buy.",
                  "We will update this guide when new models arrive."],
    },
    "de": {
        "title": ["Kaufratgeber: {cat_noun} im Vergleich", "{n} Produkte im Test", "So finden Sie das passende Produkt"],
        "intro": ["Wir haben {weeks} Wochen lang Produkte im Alltag getestet.", "Die Preise unterscheiden sich stark, daher zählt das Preis-Leistungs-Verhältnis."],
        "product": ["Das Modell {title} überzeugt mit {attr_k} von {attr_v}.", "Wer sparen will, greift zum Modell {title}.",
                    "Leser bewerten {title} im Schnitt mit {rating} von 5 Punkten."],
        "outro": ["Am Ende hängt die Wahl davon ab, wie oft Sie das Produkt nutzen.", "Prüfen Sie vor dem Kauf die Garantiebedingungen."],
    },
    "fr": {
        "title": ["Guide d'achat : bien choisir", "{n} produits comparés", "Notre test de la saison"],
        "intro": ["Nous avons testé les produits pendant {weeks} semaines à la maison.", "Les prix varient beaucoup, nous avons donc privilégié le rapport qualité-prix."],
        "product": ["Le modèle {title} se distingue par sa caractéristique {attr_k} de {attr_v}.", "Pour un petit budget, le modèle {title} est imbattable.",
                    "Les lecteurs donnent en moyenne {rating} sur 5 au modèle {title}."],
        "outro": ["Le bon choix dépend de la fréquence d'utilisation.", "Vérifiez les conditions de garantie avant d'acheter."],
    },
    "es": {
        "title": ["Guía de compra: cómo elegir", "{n} productos comparados", "Nuestra prueba de la temporada"],
        "intro": ["Probamos los productos durante {weeks} semanas en casa.", "Los precios varían mucho, así que nos centramos en la relación calidad-precio."],
        "product": ["El modelo {title} destaca por su característica {attr_k} de {attr_v}.", "Si el presupuesto importa, el modelo {title} es difícil de superar.",
                    "Los lectores puntúan el modelo {title} con {rating} sobre 5 de media."],
        "outro": ["Al final, la elección depende de cuánto lo vayas a usar.", "Revisa las condiciones de garantía antes de comprar."],
    },
}

# ---------------------------------------------------------------------------------------------------------------------
# General (non-commerce) text: topics x sentence templates with slot word lists, per language.
# ---------------------------------------------------------------------------------------------------------------------
GEN_SLOTS = {
    "en": {
        "place": ["the valley", "the old harbour", "the northern coast", "the mountain villages", "the river delta", "the city centre",
                  "the island", "the southern plains", "the forest reserve", "the market town"],
        "animal": ["otters", "swallows", "red deer", "honey bees", "salmon", "foxes", "herons", "wild boar", "seals", "owls"],
        "person": ["a retired teacher", "the mayor", "a local fisherman", "two students", "a young architect", "the historian",
                   "a volunteer group", "the head gardener", "an amateur astronomer", "a village baker"],
        "season": ["spring", "summer", "autumn", "winter"],
        "food": ["barley soup", "rye bread", "roasted chestnuts", "lentil stew", "apple cake", "grilled sardines", "mushroom risotto", "plum jam"],
        "science": ["the orbit of the moon", "tides", "the water cycle", "volcanic soil", "bird migration", "the speed of sound", "photosynthesis", "glaciers"],
        "sport": ["rowing", "chess", "cross-country skiing", "football", "cycling", "swimming", "climbing", "table tennis"],
        "century": ["twelfth", "fifteenth", "seventeenth", "eighteenth", "nineteenth"],
        "verb": ["studied", "described", "painted", "mapped", "recorded", "measured", "photographed", "wrote about"],
    },
}
GEN_TOPICS_EN = {
    "nature": [
        "Every {season}, {animal} return to {place}, and the local people count them carefully.",
        "Scientists have {verb} the habits of {animal} near {place} for more than {n} years.",
        "The wetlands around {place} shelter {animal}, rare plants and thousands of insects.",
        "When the weather turns cold, {animal} move closer to the shore to find food.",
        "A long drought in {year} changed the landscape of {place} for a decade.",
        "Old maps show that {place} was once covered by dense forest.",
        "Walking trails now connect {place} with the neighbouring hills.",
        "In {season} the light over {place} turns soft and golden in the late afternoon.",
    ],
    "history": [
        "In the {century} century, {place} was an important stop on a trade route.",
        "Records from {year} describe a great flood that destroyed the bridge near {place}.",
        "{person_cap} has {verb} the ruins of an old monastery above {place}.",
        "The town hall was rebuilt in {year} after a fire that lasted three days.",
        "Letters from that period describe harsh winters and long journeys on foot.",
        "Many families left {place} in the {century} century to look for work elsewhere.",
        "A small museum keeps tools, coins and letters from the {century} century.",
        "Historians still argue about why the settlement was abandoned.",
    ],
    "cooking": [
        "In {place}, {food} is traditionally served on cold {season} evenings.",
        "The recipe for {food} has been passed down through generations.",
        "{person_cap} says the secret of good {food} is patience and fresh ingredients.",
        "Soak the beans overnight, then simmer them slowly with onions and herbs.",
        "Bread was baked once a week in a shared oven at the edge of the village.",
        "A festival in {season} celebrates {food} with music and long tables in the square.",
        "Grandmothers in {place} still argue about the right amount of salt.",
    ],
    "science": [
        "Children at the school in {place} built a simple model to understand {science}.",
        "{person_cap} explained {science} using a bucket of water and a torch.",
        "Measurements taken in {year} helped researchers understand {science} better.",
        "The lecture on {science} drew a larger crowd than anyone expected.",
        "Understanding {science} requires careful observation over many seasons.",
        "The observatory above {place} opens to the public on clear nights.",
        "A new study suggests that {science} is more complex than textbooks say.",
    ],
    "sport": [
        "The {sport} club of {place} was founded in {year} by {person}.",
        "Training for {sport} starts early in the morning, even in {season}.",
        "The regional {sport} final drew {n} spectators to {place}.",
        "{person_cap} has coached young {sport} players for {n} years.",
        "Rain delayed the {sport} match, but nobody went home.",
        "The team celebrated its first {sport} title with a parade through {place}.",
    ],
    "city": [
        "The new tram line connects {place} with the university in twenty minutes.",
        "{person_cap} proposed turning an empty warehouse into a public library.",
        "On Sundays the streets around {place} are closed to cars.",
        "The council voted to plant {n} trees along the main avenue.",
        "Rents have risen since {year}, and many young families moved to the suburbs.",
        "A night market opens every Friday in {season} near {place}.",
    ],
}
# A few general documents about shopping: the domain classifier should find these ("mined" domain documents).
GEN_SHOPPING_EN = [
    "I compared three {noun}s online before buying one; the reviews mentioned {attr_k} a lot.",
    "The store had a discount on every {noun}, so I ordered one with free delivery.",
    "Product listings often hide the warranty terms; read them before you add a {noun} to your cart.",
    "The seller shipped the {noun} in two days and the price was lower than at the mall.",
    "My {noun} arrived with a missing part, so I asked the shop for a replacement.",
    "Customer ratings for the {noun} were mostly five stars, with a few complaints about {attr_k}.",
]

GEN_TOPICS_OTHER = {
    "de": {
        "slots": {"place": ["dem Tal", "dem alten Hafen", "der Nordküste", "den Bergdörfern", "dem Flussdelta", "der Altstadt", "der Insel"],
                  "animal": ["Fischotter", "Schwalben", "Rothirsche", "Honigbienen", "Lachse", "Füchse", "Reiher"],
                  "season": ["Frühling", "Sommer", "Herbst", "Winter"], "food": ["Gerstensuppe", "Roggenbrot", "Linseneintopf", "Apfelkuchen", "Pflaumenmus"],
                  "person": ["eine pensionierte Lehrerin", "der Bürgermeister", "ein Fischer", "zwei Studentinnen", "ein junger Architekt"]},
        "sentences": [
            "Jeden {season} kehren {animal} zu {place} zurück, und die Einheimischen zählen sie sorgfältig.",
            "Wissenschaftler beobachten die {animal} bei {place} seit mehr als {n} Jahren.",
            "Im Jahr {year} veränderte eine lange Dürre die Landschaft bei {place}.",
            "Alte Karten zeigen, dass bei {place} einst dichter Wald stand.",
            "Im {season} wird bei {place} traditionell {food} gegessen.",
            "Das Rezept für {food} wird seit Generationen weitergegeben.",
            "Laut {person} ist das Geheimnis guter Küche Geduld und frische Zutaten.",
            "Das Rathaus wurde {year} nach einem Brand wieder aufgebaut.",
            "Die neue Straßenbahn verbindet {place} in zwanzig Minuten mit der Universität.",
            "Der Rat beschloss, {n} Bäume entlang der Hauptstraße zu pflanzen.",
            "Der Ruderverein wurde {year} gegründet und trainiert auch im {season}.",
            "Briefe aus dieser Zeit berichten von harten Wintern und langen Fußmärschen.",
            "Kinder bauten ein einfaches Modell, um die Gezeiten zu verstehen.",
            "Die Sternwarte über {place} öffnet in klaren Nächten für Besucher.",
        ],
    },
    "fr": {
        "slots": {"place": ["la vallée", "le vieux port", "la côte nord", "les villages de montagne", "le delta du fleuve", "le centre-ville", "l'île"],
                  "animal": ["les loutres", "les hirondelles", "les cerfs", "les abeilles", "les saumons", "les renards", "les hérons"],
                  "season": ["printemps", "été", "automne", "hiver"], "food": ["la soupe d'orge", "le pain de seigle", "le ragoût de lentilles", "le gâteau aux pommes"],
                  "person": ["une institutrice à la retraite", "le maire", "un pêcheur", "deux étudiantes", "un jeune architecte"]},
        "sentences": [
            "Chaque {season}, {animal} reviennent vers {place} et les habitants les comptent avec soin.",
            "Des chercheurs observent {animal} près de {place} depuis plus de {n} ans.",
            "En {year}, une longue sécheresse a transformé le paysage autour de {place}.",
            "D'anciennes cartes montrent qu'une forêt dense couvrait autrefois {place}.",
            "Dans {place}, on sert {food} pendant les soirées froides.",
            "La recette de {food} se transmet de génération en génération.",
            "Selon {person}, le secret d'une bonne cuisine est la patience.",
            "La mairie a été reconstruite en {year} après un incendie.",
            "Le nouveau tramway relie {place} à l'université en vingt minutes.",
            "Le conseil a voté la plantation de {n} arbres le long de l'avenue.",
            "Le club d'aviron a été fondé en {year} et s'entraîne même en {season}.",
            "Des lettres de cette époque racontent des hivers rudes et de longs voyages à pied.",
            "Les enfants ont construit une maquette pour comprendre les marées.",
            "L'observatoire au-dessus de {place} ouvre au public les nuits claires.",
        ],
    },
    "es": {
        "slots": {"place": ["el valle", "el puerto viejo", "la costa norte", "los pueblos de montaña", "el delta del río", "el centro", "la isla"],
                  "animal": ["las nutrias", "las golondrinas", "los ciervos", "las abejas", "los salmones", "los zorros", "las garzas"],
                  "season": ["primavera", "verano", "otoño", "invierno"], "food": ["la sopa de cebada", "el pan de centeno", "el guiso de lentejas", "la tarta de manzana"],
                  "person": ["una maestra jubilada", "el alcalde", "un pescador", "dos estudiantes", "un joven arquitecto"]},
        "sentences": [
            "Cada {season}, {animal} vuelven a {place} y los vecinos las cuentan con cuidado.",
            "Los científicos estudian {animal} cerca de {place} desde hace más de {n} años.",
            "En {year}, una larga sequía cambió el paisaje de {place}.",
            "Los mapas antiguos muestran que un bosque espeso cubría {place}.",
            "En {place} se sirve {food} en las noches frías.",
            "La receta de {food} ha pasado de generación en generación.",
            "Según {person}, el secreto de la buena cocina es la paciencia.",
            "El ayuntamiento se reconstruyó en {year} después de un incendio.",
            "El nuevo tranvía une {place} con la universidad en veinte minutos.",
            "El consejo aprobó plantar {n} árboles a lo largo de la avenida.",
            "El club de remo se fundó en {year} y entrena incluso en {season}.",
            "Las cartas de aquella época hablan de inviernos duros y largos viajes a pie.",
            "Los niños construyeron una maqueta para entender las mareas.",
            "El observatorio sobre {place} abre al público en las noches despejadas.",
        ],
    },
}


class _Filler(dict):
    """str.format_map helper: fills unknown slots from a random pool so templates stay readable."""

    def __init__(self, rng: random.Random, base: dict):
        super().__init__(base)
        self.rng = rng

    def __missing__(self, key: str) -> str:
        rng = self.rng
        if key == "n":
            return str(rng.choice([3, 5, 7, 12, 20, 40, 150, 300, 2000]))
        if key == "year":
            return str(rng.randint(1820, 2024))
        if key in ("weeks", "days", "minutes", "hours", "years", "n_colors"):
            return str(rng.randint(2, 12))
        if key == "pct":
            return str(rng.choice([5, 10, 15, 20, 25, 30]))
        if key == "price":
            return str(rng.choice([19, 29, 49, 79, 99, 149, 249]))
        if key == "relative":
            return rng.choice(RELATIVES)
        if key == "city":
            return rng.choice(CITIES)
        if key.startswith("freq"):
            lang = key.split("_")[1] if "_" in key else "en"
            return rng.choice(FREQ[lang])
        raise KeyError(key)


def _fill(rng: random.Random, template: str, **slots) -> str:
    return template.format_map(_Filler(rng, slots))


def _product(rng: random.Random, idx: int, lang: str) -> dict:
    cat = rng.choice(sorted(CATEGORIES))
    spec = CATEGORIES[cat]
    k = rng.randrange(len(spec["nouns"]["en"]))
    noun = spec["nouns"][lang][k]
    brand = rng.choice(BRANDS)
    adj = rng.choice(ADJ[lang])
    attrs = {key: rng.choice(vals) for key, vals in spec["attrs"].items() if rng.random() < 0.85}
    attrs["model"] = f"{brand[:3].upper()}-{rng.randint(100, 999)}"
    title = f"{brand} {adj} {noun} {attrs['model']}" if lang != "fr" and lang != "es" else f"{noun} {adj} {brand} {attrs['model']}"
    keys = sorted(attrs)
    attr_k = rng.choice(keys)
    slots = {"adj": adj, "noun": noun, "brand": brand, "material": attrs.get("material", "recycled materials"),
             "attr_k": attr_k, "attr_v": attrs[attr_k], "warranty": attrs.get("warranty", rng.choice(["1 year", "2 years"]))}
    sents = rng.sample(DESC_SENTENCES[lang], k=min(len(DESC_SENTENCES[lang]), rng.randint(3, 6)))
    sents = [_fill(rng, s, **slots) for s in sents]
    r = rng.random()
    if r < 0.25:  # HTML-formatted description, as scraped from a shop page
        desc = "<div class=\"desc\"><p>" + "</p><p>".join(sents) + "</p><ul>" + "".join(
            f"<li><b>{kk}</b>: {attrs[kk]}</li>" for kk in keys) + "</ul></div>"
        desc = desc.replace("&", "&amp;")
    else:
        desc = " ".join(sents)
    if rng.random() < 0.15:  # shop boilerplate
        desc += " " + rng.choice(BOILERPLATE)
    pid = f"P{idx:05d}"
    return {"type": "product", "id": pid, "title": title, "category": cat, "attributes": attrs, "description": desc,
            "lang": lang, "_noun": noun, "_brand": brand}


def _review(rng: random.Random, product: dict, lang: str) -> dict:
    rating = rng.choices([1, 2, 3, 4, 5], weights=[1, 1, 2, 4, 5])[0]
    phrases = REVIEW_PHRASES[lang]
    attrs = product["attributes"]
    attr_k = rng.choice(sorted(attrs))
    slots = {"noun": product["_noun"] if lang == product["lang"] else "product", "brand": product["_brand"],
             "attr_k": attr_k, "attr_v": attrs[attr_k]}
    parts = [_fill(rng, rng.choice(phrases[rating]), **slots)]
    parts += [_fill(rng, s, **slots) for s in rng.sample(phrases["detail"], k=rng.randint(2, min(5, len(phrases["detail"]))))]
    return {"type": "review", "product_id": product["id"], "rating": rating, "text": " ".join(parts), "lang": lang}


def _article(rng: random.Random, products: list[dict], lang: str) -> dict:
    spec = ARTICLE_SENTENCES[lang]
    cat_noun = products[0]["_noun"]
    parts = [_fill(rng, rng.choice(spec["title"]), cat_noun=cat_noun, n=len(products)) + "."]
    parts += [_fill(rng, s) for s in rng.sample(spec["intro"], k=2)]
    for p in products:
        attr_k = rng.choice(sorted(p["attributes"]))
        for s in rng.sample(spec["product"], k=2):
            parts.append(_fill(rng, s, title=p["title"], attr_k=attr_k, attr_v=p["attributes"][attr_k],
                               rating=f"{rng.uniform(3.0, 4.9):.1f}"))
    parts.append(rng.choice(spec["outro"]))
    return {"type": "article", "product_ids": [p["id"] for p in products], "text": " ".join(parts), "lang": lang}


def _general_en(rng: random.Random) -> str:
    topic = rng.choice(sorted(GEN_TOPICS_EN))
    slots = {k: rng.choice(v) for k, v in GEN_SLOTS["en"].items()}
    slots["person_cap"] = slots["person"][0].upper() + slots["person"][1:]
    sents = rng.sample(GEN_TOPICS_EN[topic], k=rng.randint(4, min(7, len(GEN_TOPICS_EN[topic]))))
    # mix in one sentence from another topic so documents are not all alike
    other = rng.choice(sorted(GEN_TOPICS_EN))
    sents.insert(rng.randrange(len(sents) + 1), rng.choice(GEN_TOPICS_EN[other]))
    out = []
    for s in sents:  # re-draw some slots per sentence for variety
        if rng.random() < 0.5:
            slots = {**slots, **{k: rng.choice(v) for k, v in GEN_SLOTS["en"].items() if rng.random() < 0.4}}
            slots["person_cap"] = slots["person"][0].upper() + slots["person"][1:]
        out.append(_fill(rng, s, **slots))
    return " ".join(out)


def _general_shopping_en(rng: random.Random) -> str:
    """A web-crawl style shopping post: domain vocabulary inside the general corpus (what classify should mine)."""
    cat = rng.choice(sorted(CATEGORIES))
    spec = CATEGORIES[cat]
    k = rng.randrange(len(spec["nouns"]["en"]))
    noun = spec["nouns"]["en"][k]
    attr_k = rng.choice(sorted(spec["attrs"]))
    slots = {"noun": noun, "attr_k": attr_k, "attr_v": rng.choice(spec["attrs"][attr_k]), "brand": rng.choice(BRANDS),
             "adj": rng.choice(ADJ["en"]), "material": rng.choice(spec["attrs"].get("material", ["steel"])),
             "warranty": rng.choice(["1 year", "2 years"])}
    sents = [_fill(rng, s, **slots) for s in rng.sample(GEN_SHOPPING_EN, k=2)]
    sents += [_fill(rng, s, **slots) for s in rng.sample(REVIEW_PHRASES["en"]["detail"], k=rng.randint(2, 3))]
    sents += [_fill(rng, s, **slots) for s in rng.sample(DESC_SENTENCES["en"], k=rng.randint(1, 2))]
    rng.shuffle(sents)
    return " ".join(sents)


def _general_other(rng: random.Random, lang: str) -> str:
    spec = GEN_TOPICS_OTHER[lang]
    sents = rng.sample(spec["sentences"], k=rng.randint(4, 7))
    out = []
    for s in sents:
        slots = {k: rng.choice(v) for k, v in spec["slots"].items()}
        out.append(_fill(rng, s, **slots))
    return " ".join(out)


def generate(out_dir: Path, *, seed: int = 1234, scale: float = 1.0) -> dict[str, int]:
    """Write the sample under ``out_dir`` (domain/, general/, bad/); returns line counts per file name."""
    rng = random.Random(seed)
    n_products = int(900 * scale)
    lang_weights = [0.55, 0.15, 0.15, 0.15]
    products = [_product(rng, i, rng.choices(LANGS, weights=lang_weights)[0]) for i in range(n_products)]

    reviews: list[dict] = []
    for p in products:
        for _ in range(rng.choices([0, 1, 2, 3, 4, 5], weights=[1, 3, 3, 2, 1, 1])[0]):
            lang = p["lang"] if rng.random() < 0.8 else rng.choice(LANGS)
            reviews.append(_review(rng, p, lang))
    # duplicates as seen in real feeds: exact re-posts and near-duplicates (one word changed / punctuation)
    for r in rng.sample(reviews, k=len(reviews) // 40):
        reviews.insert(rng.randrange(len(reviews)), dict(r))
    for r in rng.sample(reviews, k=len(reviews) // 50):
        near = dict(r)
        near["text"] = r["text"].replace(".", "!", 1) + " Thanks."
        reviews.insert(rng.randrange(len(reviews)), near)

    articles: list[dict] = []
    by_cat: dict[str, list[dict]] = {}
    for p in products:
        by_cat.setdefault(p["category"], []).append(p)
    for _ in range(int(160 * scale)):
        cat = rng.choice(sorted(by_cat))
        group = rng.sample(by_cat[cat], k=rng.randint(2, 4))
        articles.append(_article(rng, group, rng.choices(LANGS, weights=lang_weights)[0]))

    general: dict[str, list[dict]] = {lang: [] for lang in LANGS}
    for i in range(int(2600 * scale)):
        text = _general_shopping_en(rng) if rng.random() < 0.03 else _general_en(rng)
        doc = {"text": text, "lang": "en"} if rng.random() < 0.9 else {"text": text}
        general["en"].append(doc)
    for lang in ("de", "fr", "es"):
        for i in range(int(260 * scale)):
            doc = {"text": _general_other(rng, lang), "lang": lang}
            if rng.random() < 0.1:
                del doc["lang"]  # language id fills it in
            general[lang].append(doc)

    counts: dict[str, int] = {}

    def dump(rel: str, rows: list[dict]) -> None:
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                row = {k: v for k, v in row.items() if not k.startswith("_")}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts[rel] = len(rows)

    dump("domain/products.jsonl", products)
    dump("domain/reviews.jsonl", reviews)
    dump("domain/articles.jsonl", articles)
    for lang, rows in general.items():
        dump(f"general/general_{lang}.jsonl", rows)

    # bad inputs: one of every kind, interleaved with valid records (kept out of the clean sample directories)
    good_p = {k: v for k, v in products[0].items() if not k.startswith("_")}
    good_r = {k: v for k, v in reviews[0].items() if not k.startswith("_")}
    bad_domain = [
        json.dumps(good_p, ensure_ascii=False).encode(),
        b'{"type": "review", "product_id": "P00001", "rating": 5, "text": "great"',  # malformed JSON
        json.dumps({"type": "review", "product_id": "P00001", "rating": 4}).encode(),  # missing field text
        json.dumps({"type": "review", "product_id": "P00001", "rating": "five", "text": "Nice kettle, works well."}).encode(),  # wrong type
        json.dumps({"type": "product", "id": 17, "title": "x", "category": "home", "attributes": {}, "description": "y", "lang": "en"}).encode(),  # wrong type
        b'{"type": "review", "product_id": "P00002", "rating": 3, "text": "bad bytes \xff\xfe here"}',  # invalid UTF-8
        json.dumps({"type": "review", "product_id": "P00002", "rating": 3, "text": "   "}).encode(),  # empty text
        json.dumps({"type": "gadget", "id": "P9"}).encode(),  # unknown record type
        b"[1, 2, 3]",  # not an object
        json.dumps(good_r, ensure_ascii=False).encode(),
        json.dumps(good_r, ensure_ascii=False).encode(),  # exact duplicate
        b"",  # blank line
    ]
    bad_general = [
        json.dumps({"text": general["en"][0]["text"], "lang": "en"}).encode(),
        b'{"text": "unterminated',  # malformed JSON
        json.dumps({"lang": "en"}).encode(),  # missing text
        json.dumps({"text": 42}).encode(),  # wrong type
        json.dumps({"text": "ok text but lang is wrong type", "lang": 7}).encode(),  # wrong type
        b'{"text": "caf\xe9 au lait"}',  # invalid UTF-8 (latin-1 byte)
        json.dumps({"text": ""}).encode(),  # empty
        json.dumps({"text": general["en"][0]["text"], "lang": "en"}).encode(),  # duplicate
    ]
    for rel, lines in (("bad/domain_bad.jsonl", bad_domain), ("bad/general_bad.jsonl", bad_general)):
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\n".join(lines) + b"\n")
        counts[rel] = len(lines)
    return counts


def sample_dir() -> Path:
    """The bundled sample folder in this checkout (the generator's default output)."""
    return Path(__file__).resolve().parent.parent / "ellama_recipes" / "sample_data"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Regenerate the bundled sample data (deterministic).")
    ap.add_argument("--out", type=Path, default=sample_dir())
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args(argv)
    counts = generate(args.out, seed=args.seed, scale=args.scale)
    for rel, n in counts.items():
        print(f"{n:7d}  {rel}")


if __name__ == "__main__":
    main()

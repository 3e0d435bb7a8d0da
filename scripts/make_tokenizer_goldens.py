"""Make the tokenizer golden fixtures: train a small youtokentome BPE model and record its ids.

Writes tests/fixtures/tokenizer/bpe.model and goldens.json (text -> ids from youtokentome).
Needs youtokentome: `pip install --no-build-isolation youtokentome`. Run from the repository root.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import youtokentome as yttm

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tokenizer"
SEED = 20240601
VOCAB_SIZE = 1500
N_STRINGS = 2600

RU_WORDS = """
кот кошка собака пёс щенок котёнок дом улица город деревня лес поле река озеро море горы небо облака
солнце луна звёзды дождь снег зима весна лето осень утро вечер ночь день человек мужчина женщина
ребёнок девочка мальчик семья друзья свадьба праздник день рождения торт цветы букет роза тюльпан
машина автобус поезд самолёт велосипед лодка корабль мост дорога здание церковь храм замок площадь
парк сад дерево берёза ёлка сосна дуб трава листья грибы ягоды яблоко груша апельсин банан арбуз
еда обед завтрак ужин кофе чай вино пиво хлеб сыр мясо рыба суп салат пицца мороженое ресторан кафе
фотография снимок портрет пейзаж закат рассвет красивый красная синий зелёный жёлтый белый чёрный
большой маленький старый новый молодой весёлый грустный тёплый холодный яркий тёмный светлый
играет бежит сидит стоит лежит спит ест пьёт смотрит улыбается танцует поёт плавает летит едет
на в под над около рядом через между перед после с и или но а также очень совсем ещё уже
пляж песок волны отпуск путешествие музей выставка концерт театр кино стадион футбол хоккей
компьютер телефон книга газета письмо картина рисунок игрушка мяч шарик подарок ёжик ёлочка
""".split()

EN_WORDS = """
cat dog puppy kitten house street city village forest field river lake sea mountain sky cloud sun moon
star rain snow winter spring summer autumn morning evening night day man woman child girl boy family
friends wedding party birthday cake flowers bouquet rose tulip car bus train plane bicycle boat ship
bridge road building church castle square park garden tree grass leaves mushrooms berries apple pear
orange banana food lunch breakfast dinner coffee tea wine beer bread cheese meat fish soup salad pizza
photo picture portrait landscape sunset sunrise beautiful red blue green yellow white black big small
old new young happy sad warm cold bright dark light playing running sitting standing lying sleeping
eating drinking looking smiling dancing singing swimming flying driving on in under over near with and
or but also very beach sand waves holiday travel museum exhibition concert theatre cinema stadium
football hockey computer phone book newspaper letter painting drawing toy ball gift the a of to is
""".split()

SYLLABLES = "ка ро ни ма то ле ви за ку ст пр ол ан ер ing tion pre con er an re th ch sh qu ly ness".split()
PUNCT = list(".,!?;:-—()«»\"'…") + ["..."]
# Rare in the corpus so that character_coverage < 1 drops some of them (they become unknown).
RARE = list("ÆøÑßæœ¿¡§¶©®™€£¥")


def make_corpus(rng: random.Random) -> str:
    """A few thousand lines of Russian, English and mixed captions, with digits and punctuation."""
    lines = []
    for i in range(6000):
        kind = i % 4
        n = rng.randint(3, 14)
        if kind == 0:
            words = rng.choices(RU_WORDS, k=n)
        elif kind == 1:
            words = rng.choices(EN_WORDS, k=n)
        elif kind == 2:
            words = rng.choices(RU_WORDS + EN_WORDS, k=n)
        else:
            words = ["".join(rng.choices(SYLLABLES, k=rng.randint(2, 4))) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 3000)))
        if rng.random() < 0.2:
            words[0] = words[0].capitalize()
        if rng.random() < 0.05:
            words.insert(rng.randrange(len(words) + 1), rng.choice(RARE))
        line = " ".join(words) + rng.choice(PUNCT + ["", ""])
        lines.append(line)
    # A few uppercase lines so capital letters are in the vocabulary.
    lines += [" ".join(rng.choices(RU_WORDS + EN_WORDS, k=6)).upper() for _ in range(300)]
    return "\n".join(lines) + "\n"


SPACES = [" ", "  ", "   ", "\t", "\n", " \t ", "\r\n", "\v", "\f", "\u2581"]
ODD = [
    "😀",
    "🐈",
    "👍🏽",
    "🇷🇺",
    "\u00a0",
    "\u0085",
    "\u3000",
    "\u200b",
    "\x00",
    "\x1c",
    "\u2028",
    "ё",
    "Ё",
    "ЁЛКА",
    "漢字",
    "مرحبا",
    "ÆØ",
    "©",
    "€",
    "\ufeff",
    "‐",
    "½",
    "ﬁ",
]


def random_char(rng: random.Random) -> str:
    """Any code point except surrogates (youtokentome cannot take those: str.encode fails)."""
    while True:
        c = rng.randint(0, 0x10FFFF) if rng.random() < 0.5 else rng.randint(0, 0x3000)
        if not 0xD800 <= c <= 0xDFFF:
            return chr(c)


def make_string(rng: random.Random) -> str:
    """One test string mixing words, spaces, punctuation, digits, emoji and random Unicode."""
    kind = rng.random()
    if kind < 0.1:
        return "".join(random_char(rng) for _ in range(rng.randint(0, 12)))
    n = rng.randint(0, 120) if kind < 0.2 else rng.randint(1, 12)
    parts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            w = rng.choice(RU_WORDS)
        elif r < 0.6:
            w = rng.choice(EN_WORDS)
        elif r < 0.7:
            w = "".join(rng.choices(SYLLABLES, k=rng.randint(1, 5)))
        elif r < 0.78:
            w = str(rng.randint(0, 10 ** rng.randint(1, 8)))
        elif r < 0.86:
            w = rng.choice(ODD)
        elif r < 0.92:
            w = rng.choice(PUNCT)
        else:
            w = "".join(random_char(rng) for _ in range(rng.randint(1, 3)))
        if rng.random() < 0.15:
            w = w.upper()
        elif rng.random() < 0.15:
            w = w.capitalize()
        parts.append(w)
        parts.append(rng.choice(SPACES) if rng.random() < 0.3 else ("" if rng.random() < 0.1 else " "))
    text = "".join(parts)
    if rng.random() < 0.15:
        text = rng.choice(SPACES) + text
    if rng.random() < 0.15:
        text += rng.choice(SPACES)
    return text


def main() -> None:
    """Train the model, make the strings, record youtokentome's ids."""
    rng = random.Random(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    model_path = OUT / "bpe.model"
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(make_corpus(rng), encoding="utf-8")
        yttm.BPE.train(
            data=str(corpus),
            model=str(model_path),
            vocab_size=VOCAB_SIZE,
            coverage=0.9995,
            n_threads=1,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
        )
    bpe = yttm.BPE(str(model_path))

    fixed = [
        "",
        " ",
        "   ",
        "\t\n",
        "\u2581",
        "кот",
        "Кот на диване",
        "  ёжик  в  тумане  ",
        "ЁЛКА",
        "a\u2581b",
    ]
    texts = fixed + [make_string(rng) for _ in range(N_STRINGS)]
    # Also the lower-cased forms, so tests can rebuild RuCLIP's tokenize() rows from the goldens.
    texts += [t.lower() for t in texts]
    texts = list(dict.fromkeys(texts))
    ids = bpe.encode(texts, output_type=yttm.OutputType.ID, dropout_prob=0)
    goldens = {"vocab_size": bpe.vocab_size(), "cases": [[t, i] for t, i in zip(texts, ids, strict=True)]}
    path = OUT / "goldens.json"
    path.write_text(json.dumps(goldens, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    print(f"{len(texts)} strings, vocab {bpe.vocab_size()}, {path.stat().st_size} bytes -> {path}")


if __name__ == "__main__":
    main()

"""What the built-in model knows: a small table of facts, the sentences that teach them in
pre-training, and the instructions that ask for them in the demo dataset.

Four relations, 100 facts each. Every fact is a lookup keyed by one subject (a country, a
word), so a ~1M-parameter model memorises all of them in a few minutes of CPU pre-training,
and every answer is specific to its subject (no constant or copied answer is right).

Pre-training sees each fact only as plain statements ("The capital of Japan is Tokyo.",
"tiger in upper case is TIGER."), never as a question followed by its bare answer and
never in an instruction template. The demo dataset asks for the same facts as instructions
("What is the capital of Japan?" -> "Tokyo"). So a tuned model that answers the test rows
(subjects it was never instructed on) shows knowledge from pre-training plus instruction
following from the fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bump when a table or a phrasing changes: part of the pre-training cache key (with the
# module's source digest) and of the demo dataset's rows.
WORLD_VERSION = 1


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        tuple(p.strip() for p in line.split("|"))  # type: ignore[misc]
        for line in text.strip().splitlines()
        if line.strip()
    )


CAPITALS = _pairs("""
Afghanistan|Kabul
Albania|Tirana
Algeria|Algiers
Angola|Luanda
Argentina|Buenos Aires
Armenia|Yerevan
Australia|Canberra
Austria|Vienna
Azerbaijan|Baku
Bangladesh|Dhaka
Belarus|Minsk
Belgium|Brussels
Bhutan|Thimphu
Brazil|Brasília
Bulgaria|Sofia
Burkina Faso|Ouagadougou
Cambodia|Phnom Penh
Cameroon|Yaoundé
Canada|Ottawa
Chile|Santiago
China|Beijing
Colombia|Bogotá
Costa Rica|San José
Croatia|Zagreb
Cuba|Havana
Denmark|Copenhagen
Ecuador|Quito
Egypt|Cairo
Estonia|Tallinn
Ethiopia|Addis Ababa
Finland|Helsinki
France|Paris
Georgia|Tbilisi
Germany|Berlin
Ghana|Accra
Greece|Athens
Honduras|Tegucigalpa
Hungary|Budapest
Iceland|Reykjavík
India|New Delhi
Indonesia|Jakarta
Iran|Tehran
Iraq|Baghdad
Ireland|Dublin
Italy|Rome
Jamaica|Kingston
Japan|Tokyo
Jordan|Amman
Kazakhstan|Astana
Kenya|Nairobi
Kyrgyzstan|Bishkek
Laos|Vientiane
Latvia|Riga
Lebanon|Beirut
Libya|Tripoli
Lithuania|Vilnius
Madagascar|Antananarivo
Malaysia|Kuala Lumpur
Mali|Bamako
Malta|Valletta
Mongolia|Ulaanbaatar
Morocco|Rabat
Mozambique|Maputo
Nepal|Kathmandu
Netherlands|Amsterdam
New Zealand|Wellington
Nicaragua|Managua
Nigeria|Abuja
North Korea|Pyongyang
Norway|Oslo
Oman|Muscat
Pakistan|Islamabad
Paraguay|Asunción
Peru|Lima
Philippines|Manila
Poland|Warsaw
Portugal|Lisbon
Qatar|Doha
Romania|Bucharest
Russia|Moscow
Rwanda|Kigali
Saudi Arabia|Riyadh
Senegal|Dakar
Serbia|Belgrade
Slovakia|Bratislava
Slovenia|Ljubljana
South Korea|Seoul
Spain|Madrid
Sudan|Khartoum
Sweden|Stockholm
Switzerland|Bern
Syria|Damascus
Thailand|Bangkok
Turkey|Ankara
Uganda|Kampala
Ukraine|Kyiv
United Kingdom|London
Uruguay|Montevideo
Venezuela|Caracas
Vietnam|Hanoi
""")

# Each word belongs to one pair only, so "the opposite of X" has one answer.
OPPOSITES = _pairs("""
hot|cold
big|small
fast|slow
happy|sad
light|dark
tall|short
open|closed
early|late
rich|poor
strong|weak
hard|soft
wet|dry
full|empty
high|low
first|last
day|night
up|down
push|pull
win|lose
buy|sell
give|take
love|hate
true|false
good|bad
clean|dirty
thick|thin
loud|quiet
sweet|sour
cheap|expensive
friend|enemy
north|south
east|west
begin|end
inside|outside
above|below
before|after
always|never
accept|refuse
arrive|leave
asleep|awake
question|answer
ancient|modern
polite|rude
safe|dangerous
wide|narrow
deep|shallow
sharp|blunt
smooth|rough
tight|loose
victory|defeat
success|failure
increase|decrease
maximum|minimum
major|minor
positive|negative
visible|invisible
possible|impossible
present|absent
public|private
simple|complex
more|less
many|few
entrance|exit
import|export
wild|tame
male|female
generous|selfish
innocent|guilty
fresh|stale
raw|cooked
remember|forget
lend|borrow
laugh|cry
sink|float
attack|defend
rise|fall
future|past
fact|fiction
plus|minus
top|bottom
front|back
summer|winter
sunrise|sunset
include|exclude
inhale|exhale
hero|villain
healthy|sick
dead|alive
near|far
dull|bright
old|young
brave|cowardly
war|peace
black|white
wise|foolish
kind|cruel
vertical|horizontal
internal|external
temporary|permanent
freeze|melt
""")

PLURALS = _pairs("""
man|men
woman|women
child|children
mouse|mice
goose|geese
tooth|teeth
foot|feet
person|people
ox|oxen
cactus|cacti
fungus|fungi
nucleus|nuclei
crisis|crises
thesis|theses
criterion|criteria
phenomenon|phenomena
wolf|wolves
knife|knives
leaf|leaves
wife|wives
half|halves
shelf|shelves
thief|thieves
loaf|loaves
calf|calves
potato|potatoes
tomato|tomatoes
hero|heroes
city|cities
baby|babies
story|stories
lady|ladies
party|parties
berry|berries
puppy|puppies
family|families
box|boxes
fox|foxes
bus|buses
dish|dishes
church|churches
watch|watches
brush|brushes
kiss|kisses
class|classes
glass|glasses
cat|cats
dog|dogs
bird|birds
tree|trees
house|houses
car|cars
book|books
pen|pens
apple|apples
river|rivers
stone|stones
cloud|clouds
tiger|tigers
piano|pianos
garden|gardens
rocket|rockets
lemon|lemons
window|windows
forest|forests
candle|candles
harbor|harbors
meadow|meadows
falcon|falcons
shoe|shoes
door|doors
chair|chairs
table|tables
horse|horses
lion|lions
snake|snakes
frog|frogs
bell|bells
boat|boats
train|trains
bridge|bridges
tower|towers
castle|castles
island|islands
planet|planets
coin|coins
lamp|lamps
bottle|bottles
spoon|spoons
plate|plates
clock|clocks
drum|drums
kite|kites
nest|nests
flower|flowers
valley|valleys
song|songs
poem|poems
letter|letters
doctor|doctors
""")

UPPERCASE = tuple(
    (w, w.upper())
    for w in """
    apple river stone cloud maple tiger piano orange silver garden rocket lemon window forest
    candle marble pepper violet harbor meadow falcon copper summer winter anchor basket blanket
    button camera carpet castle cherry circle cotton dragon engine feather finger flame ginger
    hammer helmet island jacket jungle kettle ladder lantern letter magnet mirror monkey
    mountain needle ocean orbit palace pencil pillow planet pocket puzzle rabbit ribbon saddle
    sailor shadow shovel signal spider spring sugar sunset tablet temple thunder ticket tomato
    tunnel turtle valley velvet wagon walnut whistle wizard wolf yellow zebra bridge canyon
    desert glacier honey insect lizard parrot pirate pumpkin rainbow
    """.split()
)

# relation -> facts (subject, answer)
FACTS: dict[str, tuple[tuple[str, str], ...]] = {
    "capital": CAPITALS,
    "opposite": OPPOSITES,
    "plural": PLURALS,
    "uppercase": UPPERCASE,
}

# Plain statements for pre-training; `{a}` the subject, `{b}` the answer. For opposites both
# words are subjects (the pair is stated both ways). The first phrasing of each relation is
# the probe: "The capital of Japan is" must continue with " Tokyo".
STATEMENTS: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {a} is {b}.",
        "{b} is the capital of {a}.",
        "{a} has its capital in {b}.",
        "In {a}, the capital city is {b}.",
        "{a} is a country, and its capital is {b}.",
        "If you travel to {a}, you can visit its capital, {b}.",
    ),
    "opposite": (
        "The opposite of {a} is {b}.",
        "The opposite of {b} is {a}.",
        "{a} and {b} are opposites.",
        "{b} and {a} are opposites.",
        "The word {a} means the reverse of {b}.",
        "The word {b} means the reverse of {a}.",
    ),
    "plural": (
        "The plural of {a} is {b}.",
        "one {a}, two {b}.",
        "a {a} and many {b}.",
        "{b} means more than one {a}.",
        "We say one {a}, but when there are more we say {b}.",
    ),
    "uppercase": (
        "{a} in upper case is {b}.",
        "{a} in block letters: {b}.",
        "{b} is {a} in upper case.",
        "The word {a}, written in upper case, is {b}.",
        "Write {a} in upper case and you get {b}.",
    ),
}


@dataclass(frozen=True)
class Ask:
    """One way an instruction asks for a fact: `instruction` and `input` are formatted with
    the subject as `{a}`."""

    instruction: str
    input: str = ""


# How the demo dataset asks (never part of pre-training).
ASKS: dict[str, tuple[Ask, ...]] = {
    "capital": (
        Ask("What is the capital of {a}?"),
        Ask("Name the capital city of {a}."),
        Ask("Which city is the capital of {a}?"),
        Ask("Name the capital of this country.", "{a}"),
    ),
    "opposite": (
        Ask("What is the opposite of '{a}'?"),
        Ask("Give the antonym of the word {a}."),
        Ask("Write a word that means the opposite of the given word.", "{a}"),
    ),
    "plural": (
        Ask("What is the plural of '{a}'?"),
        Ask("Write the plural form of the word {a}."),
        Ask("Give the plural of this noun.", "{a}"),
    ),
    "uppercase": (
        Ask("Convert the word to uppercase.", "{a}"),
        Ask("Write {a} in all caps."),
        Ask("Rewrite this word in capital letters.", "{a}"),
    ),
}


def statements() -> list[str]:
    """Every pre-training sentence, in table order (the trainer shuffles)."""
    out = []
    for relation, facts in FACTS.items():
        for a, b in facts:
            out.extend(s.format(a=a, b=b) for s in STATEMENTS[relation])
    return out


def probe_prompt(relation: str, subject: str) -> str:
    """The raw-form prompt whose continuation is the answer, e.g. 'The capital of Japan is'."""
    return STATEMENTS[relation][0].split("{b}")[0].format(a=subject).rstrip()

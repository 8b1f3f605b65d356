"""Real facts the tiny world is built from: capitals, continents, chemical symbols, atomic numbers, units.

Every fact becomes one question with one checkable answer (``Fact``). Facts whose answer is ambiguous
(transcontinental countries, contested capitals, one-letter symbols that read as English words) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

# (country, capital, continent)
COUNTRIES: tuple[tuple[str, str, str], ...] = (
    ("France", "Paris", "Europe"),
    ("Germany", "Berlin", "Europe"),
    ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"),
    ("Portugal", "Lisbon", "Europe"),
    ("the Netherlands", "Amsterdam", "Europe"),
    ("Belgium", "Brussels", "Europe"),
    ("Austria", "Vienna", "Europe"),
    ("Switzerland", "Bern", "Europe"),
    ("Poland", "Warsaw", "Europe"),
    ("Sweden", "Stockholm", "Europe"),
    ("Norway", "Oslo", "Europe"),
    ("Finland", "Helsinki", "Europe"),
    ("Denmark", "Copenhagen", "Europe"),
    ("Ireland", "Dublin", "Europe"),
    ("Greece", "Athens", "Europe"),
    ("Hungary", "Budapest", "Europe"),
    ("Czechia", "Prague", "Europe"),
    ("Romania", "Bucharest", "Europe"),
    ("Bulgaria", "Sofia", "Europe"),
    ("Croatia", "Zagreb", "Europe"),
    ("Serbia", "Belgrade", "Europe"),
    ("Ukraine", "Kyiv", "Europe"),
    ("Iceland", "Reykjavik", "Europe"),
    ("Estonia", "Tallinn", "Europe"),
    ("Latvia", "Riga", "Europe"),
    ("Lithuania", "Vilnius", "Europe"),
    ("Slovakia", "Bratislava", "Europe"),
    ("Slovenia", "Ljubljana", "Europe"),
    ("Japan", "Tokyo", "Asia"),
    ("China", "Beijing", "Asia"),
    ("India", "New Delhi", "Asia"),
    ("South Korea", "Seoul", "Asia"),
    ("Thailand", "Bangkok", "Asia"),
    ("Vietnam", "Hanoi", "Asia"),
    ("Indonesia", "Jakarta", "Asia"),
    ("the Philippines", "Manila", "Asia"),
    ("Malaysia", "Kuala Lumpur", "Asia"),
    ("Pakistan", "Islamabad", "Asia"),
    ("Bangladesh", "Dhaka", "Asia"),
    ("Nepal", "Kathmandu", "Asia"),
    ("Mongolia", "Ulaanbaatar", "Asia"),
    ("Iran", "Tehran", "Asia"),
    ("Iraq", "Baghdad", "Asia"),
    ("Saudi Arabia", "Riyadh", "Asia"),
    ("Jordan", "Amman", "Asia"),
    ("Qatar", "Doha", "Asia"),
    ("Afghanistan", "Kabul", "Asia"),
    ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"),
    ("Nigeria", "Abuja", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"),
    ("Ghana", "Accra", "Africa"),
    ("Morocco", "Rabat", "Africa"),
    ("Algeria", "Algiers", "Africa"),
    ("Tunisia", "Tunis", "Africa"),
    ("Senegal", "Dakar", "Africa"),
    ("Uganda", "Kampala", "Africa"),
    ("Tanzania", "Dodoma", "Africa"),
    ("Zimbabwe", "Harare", "Africa"),
    ("Zambia", "Lusaka", "Africa"),
    ("Angola", "Luanda", "Africa"),
    ("Mali", "Bamako", "Africa"),
    ("Sudan", "Khartoum", "Africa"),
    ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"),
    ("Cuba", "Havana", "North America"),
    ("Jamaica", "Kingston", "North America"),
    ("Guatemala", "Guatemala City", "North America"),
    ("Panama", "Panama City", "North America"),
    ("Honduras", "Tegucigalpa", "North America"),
    ("Brazil", "Brasilia", "South America"),
    ("Argentina", "Buenos Aires", "South America"),
    ("Chile", "Santiago", "South America"),
    ("Peru", "Lima", "South America"),
    ("Colombia", "Bogota", "South America"),
    ("Venezuela", "Caracas", "South America"),
    ("Ecuador", "Quito", "South America"),
    ("Uruguay", "Montevideo", "South America"),
    ("Paraguay", "Asuncion", "South America"),
    ("Bolivia", "Sucre", "South America"),
    ("Australia", "Canberra", "Oceania"),
    ("New Zealand", "Wellington", "Oceania"),
    ("Fiji", "Suva", "Oceania"),
    ("Papua New Guinea", "Port Moresby", "Oceania"),
)

# (element, symbol, atomic number)
ELEMENTS: tuple[tuple[str, str, int], ...] = (
    ("hydrogen", "H", 1),
    ("helium", "He", 2),
    ("lithium", "Li", 3),
    ("beryllium", "Be", 4),
    ("boron", "B", 5),
    ("carbon", "C", 6),
    ("nitrogen", "N", 7),
    ("oxygen", "O", 8),
    ("fluorine", "F", 9),
    ("neon", "Ne", 10),
    ("sodium", "Na", 11),
    ("magnesium", "Mg", 12),
    ("aluminium", "Al", 13),
    ("silicon", "Si", 14),
    ("phosphorus", "P", 15),
    ("sulfur", "S", 16),
    ("chlorine", "Cl", 17),
    ("argon", "Ar", 18),
    ("potassium", "K", 19),
    ("calcium", "Ca", 20),
    ("titanium", "Ti", 22),
    ("chromium", "Cr", 24),
    ("manganese", "Mn", 25),
    ("iron", "Fe", 26),
    ("cobalt", "Co", 27),
    ("nickel", "Ni", 28),
    ("copper", "Cu", 29),
    ("zinc", "Zn", 30),
    ("arsenic", "As", 33),
    ("selenium", "Se", 34),
    ("bromine", "Br", 35),
    ("krypton", "Kr", 36),
    ("strontium", "Sr", 38),
    ("silver", "Ag", 47),
    ("tin", "Sn", 50),
    ("xenon", "Xe", 54),
    ("barium", "Ba", 56),
    ("tungsten", "W", 74),
    ("platinum", "Pt", 78),
    ("gold", "Au", 79),
    ("mercury", "Hg", 80),
    ("lead", "Pb", 82),
    ("radon", "Rn", 86),
    ("radium", "Ra", 88),
    ("uranium", "U", 92),
    ("plutonium", "Pu", 94),
)

# (small unit plural, large unit singular, how many)
UNITS: tuple[tuple[str, str, int], ...] = (
    ("meters", "kilometer", 1000),
    ("centimeters", "meter", 100),
    ("millimeters", "centimeter", 10),
    ("grams", "kilogram", 1000),
    ("milligrams", "gram", 1000),
    ("milliliters", "liter", 1000),
    ("seconds", "minute", 60),
    ("minutes", "hour", 60),
    ("hours", "day", 24),
    ("days", "week", 7),
    ("months", "year", 12),
    ("weeks", "year", 52),
    ("days", "leap year", 366),
    ("years", "decade", 10),
    ("years", "century", 100),
    ("years", "millennium", 1000),
    ("inches", "foot", 12),
    ("feet", "yard", 3),
    ("yards", "mile", 1760),
    ("ounces", "pound", 16),
    ("pounds", "stone", 14),
    ("cups", "pint", 2),
    ("pints", "quart", 2),
    ("quarts", "gallon", 4),
    ("bits", "byte", 8),
    ("cents", "dollar", 100),
    ("sides", "hexagon", 6),
    ("sides", "octagon", 8),
    ("degrees", "right angle", 90),
    ("degrees", "full circle", 360),
)

CONTINENTS = ("Europe", "Asia", "Africa", "North America", "South America", "Oceania")


@dataclass(frozen=True)
class Fact:
    """One checkable fact.

    ``relation`` picks the question and statement templates; ``subject`` is what is asked about;
    ``answer`` is the one right answer, and ``answer_kind`` names the pool of wrong answers
    (other capitals, other symbols, ...) that preference pairs and the verifier draw on.
    """

    relation: str
    subject: str
    answer: str
    answer_kind: str

    @property
    def key(self) -> str:
        return f"{self.relation}:{self.subject}"


def all_facts() -> list[Fact]:
    facts: list[Fact] = []
    for country, capital, continent in COUNTRIES:
        facts.append(Fact("capital", country, capital, "capital"))
        facts.append(Fact("continent", country, continent, "continent"))
    for element, symbol, number in ELEMENTS:
        facts.append(Fact("symbol", element, symbol, "symbol"))
        facts.append(Fact("atomic_number", element, str(number), "number"))
    for small, large, n in UNITS:
        facts.append(Fact("units", f"{small}|{large}", str(n), "number"))
    return facts


def answer_pool(kind: str) -> tuple[str, ...]:
    """Every answer of one kind, for drawing wrong answers and checking that none sneaks in."""
    if kind == "capital":
        return tuple(c for _, c, _ in COUNTRIES)
    if kind == "continent":
        return CONTINENTS
    if kind == "symbol":
        return tuple(s for _, s, _ in ELEMENTS)
    raise ValueError(f"no answer pool for kind {kind!r}")

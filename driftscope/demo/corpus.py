"""The demo's built-in corpus: short math and general-domain texts the project ships itself (no downloads)."""

MATH = [
    "Let x be a real number such that 3x + 7 = 22. Subtracting 7 from both sides gives 3x = 15, so x = 5.",
    "The sum of the first n positive integers is n(n + 1)/2, so the sum of 1 through 100 is 5050.",
    "A triangle with sides 3, 4 and 5 is a right triangle because 9 + 16 = 25.",
    "If a fair die is rolled twice, the probability that both rolls show six is 1/36.",
    "The derivative of x squared is 2x, and the integral of 2x from 0 to 3 is 9.",
    "Since 91 = 7 × 13, the number 91 is not prime, although it is often mistaken for one.",
    "The greatest common divisor of 48 and 180 is 12, found by the Euclidean algorithm.",
    "A geometric series with ratio 1/2 starting at 1 converges to 2.",
]
GENERAL = [
    "The museum opens at nine in the morning and closes at five in the afternoon on weekdays.",
    "She packed an umbrella because the forecast said it would rain in the evening.",
    "Rivers carry sediment downstream and deposit it where the water slows near the coast.",
    "Please summarise the following paragraph in one sentence and keep the original tone.",
    "The committee postponed the vote until every member had read the final report.",
    "Bread rises because yeast ferments sugar and releases carbon dioxide into the dough.",
    "Answer the question using only the information given in the passage above.",
    "The train to the city leaves from platform four every twenty minutes.",
]
TEXTS = MATH + GENERAL

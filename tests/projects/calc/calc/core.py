def add(a, b):
    return a + b


def divide(a, b):
    if b == 0:
        raise ZeroDivisionError("b must not be zero")
    return a / b


def classify(n):
    if n < 0:
        return "negative"
    if n == 0:
        return "zero"
    if n % 2:
        return "odd"
    return "even"


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def never_called():
    return "this line is not covered"

def mean(values):
    try:
        import numpy
    except ImportError:
        return sum(values) / len(values)
    return float(numpy.mean(numpy.asarray(values, dtype=float)))


def normalize(values):
    import numpy

    array = numpy.asarray(values, dtype=float)
    span = array.max() - array.min()
    if span == 0:
        return [0.0 for _ in values]
    return ((array - array.min()) / span).tolist()

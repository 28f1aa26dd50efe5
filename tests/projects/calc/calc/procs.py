import multiprocessing
import sys


def square(x):
    return x * x


def squares_in_processes(values):
    pool = multiprocessing.get_context("fork").Pool(2)
    try:
        return pool.map(square, values)
    finally:
        pool.close()  # the workers end (and save their coverage data) before the test goes on
        pool.join()


def main(argv):
    total = sum(int(v) for v in argv)
    if total > 100:
        print("big")
    else:
        print(f"sum={total}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

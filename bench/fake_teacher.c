/* Benchmark teacher: reads the prompt on stdin, sleeps argv[1] seconds, prints a valid dialectical answer.
   A tiny binary so that the benchmark measures the queue, not an interpreter's start-up. */
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static const char ANSWER[] =
    "<thought>\n"
    "**THESIS**: The first position holds that the request deserves a direct and simple answer.\n"
    "**ANTITHESIS**: A direct answer can hide the trade-offs, exceptions and costs that matter.\n"
    "**SYNTHESIS**: A good answer states the main position and names where it stops holding.\n"
    "</thought>\n"
    "It depends on the conditions named above.\n";

int main(int argc, char **argv) {
    char buf[65536];
    while (read(0, buf, sizeof buf) > 0) {}
    double s = argc > 1 ? atof(argv[1]) : 0.0;
    if (s > 0) {
        struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
        nanosleep(&ts, NULL);
    }
    size_t n = sizeof ANSWER - 1, off = 0;
    while (off < n) {
        ssize_t w = write(1, ANSWER + off, n - off);
        if (w <= 0) return 1;
        off += (size_t)w;
    }
    return 0;
}

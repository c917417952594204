/* librbd's own LUKS2 encryption as a peer (benches/rbd/peers.sh), because fio's rbd engine
 * cannot load an encryption format and qemu's rbd driver is not loadable here (Debian 12's
 * qemu-block-extra 7.2 module refuses to load into qemu-utils 10.0: "Only modules from the
 * same build can be loaded").
 *
 *   luks_peer CONF CLIENT POOL IMAGE PASSPHRASE format|open|RW BS QD SECONDS RAMP
 *
 * format: rbd_encryption_format(LUKS2, AES-256) on the image (PBKDF2 once).
 * open:   prints the time of rbd_open + rbd_encryption_load (what every attach pays).
 * RW:     read|write|randread|randwrite|fill (fill: one sequential write pass) with librbd's
 *         async API, QD requests in flight, BS bytes each, over the decrypted size; prints
 *         "MiB/s IOPS". Not a test. Build: cc -O2 -o luks_peer luks_peer.c -lrbd -lrados */
#include <rados/librados.h>
#include <rbd/librbd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
#define CHECK(what, r)                                                       \
    do {                                                                     \
        int r_ = (r);                                                        \
        if (r_ < 0) {                                                        \
            fprintf(stderr, "luks_peer: %s: %s\n", what, strerror(-r_));     \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

static uint64_t rnd(uint64_t *s) { /* xorshift64 */
    *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17; return *s;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: luks_peer CONF CLIENT POOL IMAGE PASSPHRASE format|open|RW [BS QD SECONDS RAMP]\n");
        return 2;
    }
    const char *conf = argv[1], *client = argv[2], *pool = argv[3], *name = argv[4];
    const char *pass = argv[5], *mode = argv[6];
    rados_t c;
    rados_ioctx_t io;
    rbd_image_t img;
    CHECK("rados_create", rados_create(&c, client));
    CHECK("conf", rados_conf_read_file(c, conf));
    CHECK("connect", rados_connect(c));
    CHECK("ioctx", rados_ioctx_create(c, pool, &io));
    double t0 = now();
    CHECK("open", rbd_open(io, name, &img, NULL));
    if (!strcmp(mode, "format")) {
        rbd_encryption_luks2_format_options_t o = {RBD_ENCRYPTION_ALGORITHM_AES256, pass, strlen(pass)};
        CHECK("encryption_format", rbd_encryption_format(img, RBD_ENCRYPTION_FORMAT_LUKS2, &o, sizeof o));
        rbd_close(img);
        rados_ioctx_destroy(io);
        rados_shutdown(c);
        return 0;
    }
    rbd_encryption_luks2_format_options_t lo = {RBD_ENCRYPTION_ALGORITHM_AES256, pass, strlen(pass)};
    CHECK("encryption_load", rbd_encryption_load(img, RBD_ENCRYPTION_FORMAT_LUKS2, &lo, sizeof lo));
    double t1 = now();
    if (!strcmp(mode, "open")) {
        printf("%.1f\n", (t1 - t0) * 1000.0);
        return 0;
    }
    if (argc < 11) return 2;
    uint64_t bs = strtoull(argv[7], NULL, 0);
    int qd = atoi(argv[8]);
    double secs = atof(argv[9]), ramp = atof(argv[10]);
    uint64_t size;
    CHECK("size", rbd_get_size(img, &size));
    uint64_t blocks = size / bs;
    int fill = !strcmp(mode, "fill");
    int write = fill || !strcmp(mode, "write") || !strcmp(mode, "randwrite");
    int rand_ = !strncmp(mode, "rand", 4);
    char **bufs = calloc(qd, sizeof *bufs);
    rbd_completion_t *comp = calloc(qd, sizeof *comp);
    for (int i = 0; i < qd; i++) {
        if (posix_memalign((void **)&bufs[i], 4096, bs)) return 1;
        memset(bufs[i], 0x5a + i, bs);
    }
    uint64_t seed = 0x9e3779b97f4a7c15ull, next = 0, done = 0, counted = 0;
    double start = now(), mstart = start + ramp, end = mstart + secs;
    int measuring = ramp <= 0;
    if (fill) end = 1e18;
#define SUBMIT(i)                                                               \
    do {                                                                        \
        uint64_t blk = rand_ ? rnd(&seed) % blocks : (next++ % blocks);         \
        CHECK("aio_create", rbd_aio_create_completion(NULL, NULL, &comp[i]));   \
        if (write) CHECK("aio_write", rbd_aio_write(img, blk * bs, bs, bufs[i], comp[i])); \
        else CHECK("aio_read", rbd_aio_read(img, blk * bs, bs, bufs[i], comp[i]));         \
    } while (0)
    for (int i = 0; i < qd; i++) SUBMIT(i);
    int i = 0;
    for (;;) {
        rbd_aio_wait_for_complete(comp[i]);
        ssize_t r = rbd_aio_get_return_value(comp[i]);
        rbd_aio_release(comp[i]);
        CHECK("io", (int)r);
        done++;
        double t = now();
        if (!measuring && t >= mstart) { measuring = 1; mstart = t; counted = 0; }
        else if (measuring) counted++;
        if ((fill && next >= blocks) || t >= end) {
            comp[i] = NULL;
            for (int k = 0; k < qd; k++) if (comp[k]) { rbd_aio_wait_for_complete(comp[k]); rbd_aio_release(comp[k]); }
            break;
        }
        SUBMIT(i);
        i = (i + 1) % qd;
    }
    double el = now() - mstart;
    if (fill) { el = now() - start; counted = done; }
    printf("%.1f %.0f\n", counted * (double)bs / el / 1048576.0, counted / el);
    rbd_close(img);
    rados_ioctx_destroy(io);
    rados_shutdown(c);
    return 0;
}

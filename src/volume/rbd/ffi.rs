//! The librados/librbd C API used by cryptvol, declared by hand from Ceph 16.2's
//! `/usr/include/rados/librados.h` and `/usr/include/rbd/librbd.h` (the line-for-line
//! signatures are in the comments of each group). Only what [`super`] calls; no bindgen.
//!
//! Every function returns 0 or a byte count on success and a negative errno on failure (the
//! `rbd_*` I/O calls return `ssize_t`). Handles are opaque pointers.
#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_void, size_t, ssize_t};

/// `typedef void *rados_t;`
pub type rados_t = *mut c_void;
/// `typedef void *rados_ioctx_t;`
pub type rados_ioctx_t = *mut c_void;
/// `typedef void *rados_write_op_t;`
pub type rados_write_op_t = *mut c_void;
/// `#define LIBRADOS_CREATE_EXCLUSIVE 1` (of `rados_write_op_create`).
pub const LIBRADOS_CREATE_EXCLUSIVE: c_int = 1;
/// `#define LIBRADOS_CREATE_IDEMPOTENT 0`: create, or leave an existing object alone.
pub const LIBRADOS_CREATE_IDEMPOTENT: c_int = 0;

/// `struct notify_ack_t { uint64_t notifier_id; uint64_t cookie; char *payload;
/// uint64_t payload_len; }` (rados_types.h): one watcher's answer to a notify.
#[repr(C)]
pub struct notify_ack_t {
    pub notifier_id: u64,
    pub cookie: u64,
    pub payload: *mut c_char,
    pub payload_len: u64,
}

/// `struct notify_timeout_t { uint64_t notifier_id; uint64_t cookie; }`: a watcher that did
/// not answer in time.
#[repr(C)]
pub struct notify_timeout_t {
    pub notifier_id: u64,
    pub cookie: u64,
}

/// `typedef void (*rados_watchcb2_t)(void *arg, uint64_t notify_id, uint64_t handle,
/// uint64_t notifier_id, void *data, size_t data_len);`: a notify arrived (on one of
/// librados's finisher threads).
pub type rados_watchcb2_t = unsafe extern "C" fn(*mut c_void, u64, u64, u64, *mut c_void, size_t);
/// `typedef void (*rados_watcherrcb_t)(void *pre, uint64_t cookie, int err);`: the watch
/// broke (e.g. `ENOTCONN` after a disconnection longer than its timeout).
pub type rados_watcherrcb_t = unsafe extern "C" fn(*mut c_void, u64, c_int);
/// `typedef void *rbd_image_t;`
pub type rbd_image_t = *mut c_void;
/// `typedef void *rbd_image_options_t;`
pub type rbd_image_options_t = *mut c_void;

/// `typedef enum { RBD_LOCK_MODE_EXCLUSIVE = 0, RBD_LOCK_MODE_SHARED = 1 } rbd_lock_mode_t;`
pub type rbd_lock_mode_t = c_int;
pub const RBD_LOCK_MODE_EXCLUSIVE: rbd_lock_mode_t = 0;

/// `RBD_IMAGE_OPTION_ORDER = 2` (of `rbd_image_option_t`).
pub const RBD_IMAGE_OPTION_ORDER: c_int = 2;

/// `typedef struct { char *id; char *name; } rbd_image_spec_t;`
#[repr(C)]
pub struct rbd_image_spec_t {
    pub id: *mut c_char,
    pub name: *mut c_char,
}

/// `typedef struct { uint64_t id; uint64_t size; const char *name; } rbd_snap_info_t;`
#[repr(C)]
pub struct rbd_snap_info_t {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

/// `typedef void *rbd_completion_t;`
pub type rbd_completion_t = *mut c_void;
/// `typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);`: called once per
/// completion, on one of librbd's threads (Pacific: its API strand, one callback at a time).
pub type rbd_callback_t = unsafe extern "C" fn(rbd_completion_t, *mut c_void);

/// `int (*cb)(uint64_t, size_t, int, void *)` of `rbd_diff_iterate2`: offset, length,
/// exists (1 data, 0 hole), the caller's argument; a negative return stops the iteration.
pub type rbd_diff_cb = unsafe extern "C" fn(u64, size_t, c_int, *mut c_void) -> c_int;

#[link(name = "rados")]
unsafe extern "C" {
    // int rados_create2(rados_t *pcluster, const char *const clustername,
    //                   const char * const name, uint64_t flags);
    pub fn rados_create2(
        pcluster: *mut rados_t,
        clustername: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    // int rados_conf_read_file(rados_t cluster, const char *path);
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    // int rados_conf_set(rados_t cluster, const char *option, const char *value);
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    // int rados_connect(rados_t cluster);
    pub fn rados_connect(cluster: rados_t) -> c_int;
    // void rados_shutdown(rados_t cluster);
    pub fn rados_shutdown(cluster: rados_t);
    // uint64_t rados_get_instance_id(rados_t cluster);
    pub fn rados_get_instance_id(cluster: rados_t) -> u64;
    // int rados_getaddrs(rados_t cluster, char** addrs);   (free() the string)
    pub fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
    // int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx);
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    // void rados_ioctx_destroy(rados_ioctx_t io);
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);

    // Whole objects (the shared key records, src/daemon/ceph_kms.rs).
    // int rados_stat(rados_ioctx_t io, const char *o, uint64_t *psize, time_t *pmtime);
    pub fn rados_stat(
        io: rados_ioctx_t,
        o: *const c_char,
        psize: *mut u64,
        pmtime: *mut libc::time_t,
    ) -> c_int;
    // int rados_read(rados_ioctx_t io, const char *oid, char *buf, size_t len, uint64_t off);
    pub fn rados_read(
        io: rados_ioctx_t,
        oid: *const c_char,
        buf: *mut c_char,
        len: size_t,
        off: u64,
    ) -> c_int;
    // uint64_t rados_get_last_version(rados_ioctx_t io);
    pub fn rados_get_last_version(io: rados_ioctx_t) -> u64;
    // rados_write_op_t rados_create_write_op(void);
    pub fn rados_create_write_op() -> rados_write_op_t;
    // void rados_release_write_op(rados_write_op_t write_op);
    pub fn rados_release_write_op(write_op: rados_write_op_t);
    // void rados_write_op_assert_version(rados_write_op_t write_op, uint64_t ver);
    pub fn rados_write_op_assert_version(write_op: rados_write_op_t, ver: u64);
    // void rados_write_op_create(rados_write_op_t write_op, int exclusive,
    //                            const char* category);
    pub fn rados_write_op_create(
        write_op: rados_write_op_t,
        exclusive: c_int,
        category: *const c_char,
    );
    // void rados_write_op_write_full(rados_write_op_t write_op, const char *buffer,
    //                                size_t len);
    pub fn rados_write_op_write_full(
        write_op: rados_write_op_t,
        buffer: *const c_char,
        len: size_t,
    );
    // int rados_write_op_operate(rados_write_op_t write_op, rados_ioctx_t io, const char *oid,
    //                            time_t *mtime, int flags);
    pub fn rados_write_op_operate(
        write_op: rados_write_op_t,
        io: rados_ioctx_t,
        oid: *const c_char,
        mtime: *mut libc::time_t,
        flags: c_int,
    ) -> c_int;
    // int rados_remove(rados_ioctx_t io, const char *oid);
    pub fn rados_remove(io: rados_ioctx_t, oid: *const c_char) -> c_int;
    // int rados_watch3(rados_ioctx_t io, const char *o, uint64_t *cookie,
    //                  rados_watchcb2_t watchcb, rados_watcherrcb_t watcherrcb,
    //                  uint32_t timeout, void *arg);
    pub fn rados_watch3(
        io: rados_ioctx_t,
        o: *const c_char,
        cookie: *mut u64,
        watchcb: rados_watchcb2_t,
        watcherrcb: rados_watcherrcb_t,
        timeout: u32,
        arg: *mut c_void,
    ) -> c_int;
    // int rados_unwatch2(rados_ioctx_t io, uint64_t cookie);
    pub fn rados_unwatch2(io: rados_ioctx_t, cookie: u64) -> c_int;
    // int rados_watch_flush(rados_t cluster);
    pub fn rados_watch_flush(cluster: rados_t) -> c_int;
    // int rados_notify_ack(rados_ioctx_t io, const char *o, uint64_t notify_id,
    //                      uint64_t cookie, const char *buf, int buf_len);
    pub fn rados_notify_ack(
        io: rados_ioctx_t,
        o: *const c_char,
        notify_id: u64,
        cookie: u64,
        buf: *const c_char,
        buf_len: c_int,
    ) -> c_int;
    // int rados_notify2(rados_ioctx_t io, const char *o, const char *buf, int buf_len,
    //                   uint64_t timeout_ms, char **reply_buffer, size_t *reply_buffer_len);
    pub fn rados_notify2(
        io: rados_ioctx_t,
        o: *const c_char,
        buf: *const c_char,
        buf_len: c_int,
        timeout_ms: u64,
        reply_buffer: *mut *mut c_char,
        reply_buffer_len: *mut size_t,
    ) -> c_int;
    // int rados_decode_notify_response(char *reply_buffer, size_t reply_buffer_len,
    //     struct notify_ack_t **acks, size_t *nr_acks,
    //     struct notify_timeout_t **timeouts, size_t *nr_timeouts);
    pub fn rados_decode_notify_response(
        reply_buffer: *mut c_char,
        reply_buffer_len: size_t,
        acks: *mut *mut notify_ack_t,
        nr_acks: *mut size_t,
        timeouts: *mut *mut notify_timeout_t,
        nr_timeouts: *mut size_t,
    ) -> c_int;
    // void rados_free_notify_response(struct notify_ack_t *acks, size_t nr_acks,
    //                                 struct notify_timeout_t *timeouts);
    pub fn rados_free_notify_response(
        acks: *mut notify_ack_t,
        nr_acks: size_t,
        timeouts: *mut notify_timeout_t,
    );
    // void rados_buffer_free(char *buf);
    pub fn rados_buffer_free(buf: *mut c_char);
}

#[link(name = "rbd")]
unsafe extern "C" {
    // void rbd_image_options_create(rbd_image_options_t* opts);
    pub fn rbd_image_options_create(opts: *mut rbd_image_options_t);
    // void rbd_image_options_destroy(rbd_image_options_t opts);
    pub fn rbd_image_options_destroy(opts: rbd_image_options_t);
    // int rbd_image_options_set_uint64(rbd_image_options_t opts, int optname, uint64_t optval);
    pub fn rbd_image_options_set_uint64(
        opts: rbd_image_options_t,
        optname: c_int,
        optval: u64,
    ) -> c_int;
    // int rbd_create4(rados_ioctx_t io, const char *name, uint64_t size,
    //                 rbd_image_options_t opts);
    pub fn rbd_create4(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        opts: rbd_image_options_t,
    ) -> c_int;
    // int rbd_remove(rados_ioctx_t io, const char *name);
    pub fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    // int rbd_rename(rados_ioctx_t src_io_ctx, const char *srcname, const char *destname);
    pub fn rbd_rename(io: rados_ioctx_t, srcname: *const c_char, destname: *const c_char) -> c_int;
    // int rbd_list2(rados_ioctx_t io, rbd_image_spec_t* images, size_t *max_images);
    pub fn rbd_list2(
        io: rados_ioctx_t,
        images: *mut rbd_image_spec_t,
        max_images: *mut size_t,
    ) -> c_int;
    // void rbd_image_spec_list_cleanup(rbd_image_spec_t *images, size_t num_images);
    pub fn rbd_image_spec_list_cleanup(images: *mut rbd_image_spec_t, num_images: size_t);

    // int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image,
    //              const char *snap_name);
    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    // int rbd_open_read_only(rados_ioctx_t io, const char *name, rbd_image_t *image,
    //                        const char *snap_name);
    pub fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    // int rbd_close(rbd_image_t image);
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    // int rbd_get_size(rbd_image_t image, uint64_t *size);
    pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    // int rbd_resize(rbd_image_t image, uint64_t size);
    pub fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;

    // ssize_t rbd_read2(rbd_image_t image, uint64_t ofs, size_t len, char *buf, int op_flags);
    pub fn rbd_read2(
        image: rbd_image_t,
        ofs: u64,
        len: size_t,
        buf: *mut c_char,
        op_flags: c_int,
    ) -> ssize_t;
    // ssize_t rbd_write2(rbd_image_t image, uint64_t ofs, size_t len, const char *buf,
    //                    int op_flags);
    pub fn rbd_write2(
        image: rbd_image_t,
        ofs: u64,
        len: size_t,
        buf: *const c_char,
        op_flags: c_int,
    ) -> ssize_t;
    // int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb,
    //                               rbd_completion_t *c);
    pub fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    // ssize_t rbd_aio_get_return_value(rbd_completion_t c);
    pub fn rbd_aio_get_return_value(c: rbd_completion_t) -> ssize_t;
    // void rbd_aio_release(rbd_completion_t c);
    pub fn rbd_aio_release(c: rbd_completion_t);
    // int rbd_aio_read2(rbd_image_t image, uint64_t off, size_t len, char *buf,
    //                   rbd_completion_t c, int op_flags);
    pub fn rbd_aio_read2(
        image: rbd_image_t,
        off: u64,
        len: size_t,
        buf: *mut c_char,
        c: rbd_completion_t,
        op_flags: c_int,
    ) -> c_int;
    // int rbd_aio_write2(rbd_image_t image, uint64_t off, size_t len, const char *buf,
    //                    rbd_completion_t c, int op_flags);
    pub fn rbd_aio_write2(
        image: rbd_image_t,
        off: u64,
        len: size_t,
        buf: *const c_char,
        c: rbd_completion_t,
        op_flags: c_int,
    ) -> c_int;
    // int rbd_discard(rbd_image_t image, uint64_t ofs, uint64_t len);
    pub fn rbd_discard(image: rbd_image_t, ofs: u64, len: u64) -> c_int;
    // ssize_t rbd_write_zeroes(rbd_image_t image, uint64_t ofs, size_t len, int zero_flags,
    //                          int op_flags);
    pub fn rbd_write_zeroes(
        image: rbd_image_t,
        ofs: u64,
        len: size_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> ssize_t;
    // int rbd_flush(rbd_image_t image);
    pub fn rbd_flush(image: rbd_image_t) -> c_int;
    // int rbd_diff_iterate2(rbd_image_t image, const char *fromsnapname, uint64_t ofs,
    //                       uint64_t len, uint8_t include_parent, uint8_t whole_object,
    //                       int (*cb)(uint64_t, size_t, int, void *), void *arg);
    pub fn rbd_diff_iterate2(
        image: rbd_image_t,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: rbd_diff_cb,
        arg: *mut c_void,
    ) -> c_int;

    // int rbd_lock_acquire(rbd_image_t image, rbd_lock_mode_t lock_mode);
    pub fn rbd_lock_acquire(image: rbd_image_t, lock_mode: rbd_lock_mode_t) -> c_int;
    // int rbd_lock_release(rbd_image_t image);
    pub fn rbd_lock_release(image: rbd_image_t) -> c_int;
    // int rbd_is_exclusive_lock_owner(rbd_image_t image, int *is_owner);
    pub fn rbd_is_exclusive_lock_owner(image: rbd_image_t, is_owner: *mut c_int) -> c_int;
    // int rbd_lock_get_owners(rbd_image_t image, rbd_lock_mode_t *lock_mode,
    //                         char **lock_owners, size_t *max_lock_owners);
    pub fn rbd_lock_get_owners(
        image: rbd_image_t,
        lock_mode: *mut rbd_lock_mode_t,
        lock_owners: *mut *mut c_char,
        max_lock_owners: *mut size_t,
    ) -> c_int;
    // void rbd_lock_get_owners_cleanup(char **lock_owners, size_t lock_owner_count);
    pub fn rbd_lock_get_owners_cleanup(lock_owners: *mut *mut c_char, lock_owner_count: size_t);
    // int rbd_lock_break(rbd_image_t image, rbd_lock_mode_t lock_mode,
    //                    const char *lock_owner);
    pub fn rbd_lock_break(
        image: rbd_image_t,
        lock_mode: rbd_lock_mode_t,
        lock_owner: *const c_char,
    ) -> c_int;

    // int rbd_metadata_get(rbd_image_t image, const char *key, char *value, size_t *val_len);
    pub fn rbd_metadata_get(
        image: rbd_image_t,
        key: *const c_char,
        value: *mut c_char,
        val_len: *mut size_t,
    ) -> c_int;
    // int rbd_metadata_set(rbd_image_t image, const char *key, const char *value);
    pub fn rbd_metadata_set(image: rbd_image_t, key: *const c_char, value: *const c_char) -> c_int;

    // Snapshots (src/daemon/rbd_snapshots.rs).
    // int rbd_snap_create(rbd_image_t image, const char *snapname);
    pub fn rbd_snap_create(image: rbd_image_t, snapname: *const c_char) -> c_int;
    // int rbd_snap_remove(rbd_image_t image, const char *snapname);
    pub fn rbd_snap_remove(image: rbd_image_t, snapname: *const c_char) -> c_int;
    // int rbd_snap_list(rbd_image_t image, rbd_snap_info_t *snaps, int *max_snaps);
    // (room for the snapshots and a terminating entry; returns the count, or -ERANGE with
    // the needed room in *max_snaps)
    pub fn rbd_snap_list(
        image: rbd_image_t,
        snaps: *mut rbd_snap_info_t,
        max_snaps: *mut c_int,
    ) -> c_int;
    // void rbd_snap_list_end(rbd_snap_info_t *snaps);
    pub fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
    // int rbd_snap_get_timestamp(rbd_image_t image, uint64_t snap_id,
    //                            struct timespec *timestamp);
    pub fn rbd_snap_get_timestamp(
        image: rbd_image_t,
        snap_id: u64,
        timestamp: *mut libc::timespec,
    ) -> c_int;
}

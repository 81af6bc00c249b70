// Matrix product family: out[z] = a[z] (m x k) * b[z] (k x n), batched with broadcasting.
//
// Operands are read through strides, so transposed operands and broadcast batches need no copy.
// Each invocation computes a 4x4 block of the output in registers; a workgroup of 8x8
// invocations covers a 32x32 tile. Batch z (p.z_base + workgroup_id.z) is decomposed over
// p.bshape to find each operand's batch offset (stride 0 on a broadcast batch axis).
//
// Bindings:
//   a   (0): (batch..., m, k) strided: rows p.a_rs, columns p.a_cs, batches p.sa
//   b   (1): (batch..., k, n) strided: rows p.b_rs, columns p.b_cs, batches p.sb
//   bias (2): (n) from p.off_bias, added when p.epilogue has EPILOGUE_BIAS (then the
//             activation of the epilogue, if any: the fused tail of a linear layer); (m)
//             with EPILOGUE_BIAS_ROWS (a convolution's channels, as weight @ im2col)
//   out (3): (batch..., m, n) contiguous
//   p   (4): MatmulParams (src/ops/matmul.rs)

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch_rank: u32,
    off_a: u32,
    off_b: u32,
    a_rs: u32,
    a_cs: u32,
    b_rs: u32,
    b_cs: u32,
    z_base: u32,
    epilogue: u32,
    act_alpha: f32,
    off_bias: u32,
    // The vec4 kernels' column chunk under FOLD_B_COLS / FOLD_OUT_COLS (build.rs).
    col_split: u32,
    _pad0: u32,
    bshape: array<vec4<u32>, 2>,
    sa: array<vec4<u32>, 2>,
    sb: array<vec4<u32>, 2>,
}

// Element types of the input and output buffers: f32, or f16 in the variants that src/kernels.rs
// derives from this file (arithmetic stays in f32).
alias IN = f32;
alias OUT = f32;

@group(0) @binding(0) var<storage, read> a: array<IN>;
@group(0) @binding(1) var<storage, read> b: array<IN>;
@group(0) @binding(2) var<storage, read> bias: array<IN>;
@group(0) @binding(3) var<storage, read_write> out: array<OUT>;
@group(0) @binding(4) var<uniform> p: Params;

// Start of batch z in a and in b (stride 0 on a broadcast batch axis); `rank` is p.batch_rank.
fn batch_bases(z: u32, rank: u32) -> vec2<u32> {
    var rem = z;
    var base = vec2<u32>(p.off_a, p.off_b);
    for (var d = i32(rank) - 1; d >= 0; d -= 1) {
        let q = u32(d);
        let size = p.bshape[q >> 2u][q & 3u];
        let idx = rem % size;
        rem = rem / size;
        base += idx * vec2<u32>(p.sa[q >> 2u][q & 3u], p.sb[q >> 2u][q & 3u]);
    }
    return base;
}

// Stores v at row r, column c (both in range) through the epilogue: the bias at column c (row
// r with EPILOGUE_BIAS_ROWS), then the activation.
fn store_out(out_base: u32, r: u32, c: u32, v: f32) {
    var x = v;
    if ((p.epilogue & EPILOGUE_BIAS) != 0u) {
        x += f32(bias[p.off_bias + select(c, r, (p.epilogue & EPILOGUE_BIAS_ROWS) != 0u)]);
    }
    out[out_base + r * p.n + c] = OUT(epilogue_activation(x, p.epilogue, p.act_alpha));
}

@compute @workgroup_size(8, 8)
fn matmul_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let z = p.z_base + wid.z;
    let bases = batch_bases(z, p.batch_rank);
    let base_a = bases.x;
    let base_b = bases.y;

    let row0 = (wid.y * 8u + lid.y) * 4u;
    let col0 = (wid.x * 8u + lid.x) * 4u;
    if (row0 >= p.m || col0 >= p.n) {
        return;
    }
    // Rows and columns past the edge are clamped to the last valid one for loading; their
    // results are never stored.
    var ra: vec4<u32>;
    var cb: vec4<u32>;
    for (var i = 0u; i < 4u; i += 1u) {
        ra[i] = base_a + min(row0 + i, p.m - 1u) * p.a_rs;
        cb[i] = base_b + min(col0 + i, p.n - 1u) * p.b_cs;
    }

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var kk = 0u; kk < p.k; kk += 1u) {
        let ka = kk * p.a_cs;
        let kb = kk * p.b_rs;
        let bv = vec4<f32>(f32(b[cb.x + kb]), f32(b[cb.y + kb]), f32(b[cb.z + kb]), f32(b[cb.w + kb]));
        acc0 += f32(a[ra.x + ka]) * bv;
        acc1 += f32(a[ra.y + ka]) * bv;
        acc2 += f32(a[ra.z + ka]) * bv;
        acc3 += f32(a[ra.w + ka]) * bv;
    }

    let out_base = z * p.m * p.n;
    let rows = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i += 1u) {
        let r = row0 + i;
        if (r >= p.m) {
            break;
        }
        for (var j = 0u; j < 4u; j += 1u) {
            let cc = col0 + j;
            if (cc < p.n) {
                store_out(out_base, r, cc, rows[i][j]);
            }
        }
    }
}

// ---- shared-memory tiled variant ----
//
// A workgroup of 16x16 invocations computes a 64x64 tile of the output, each invocation a
// 4x4 block. The k axis advances in steps of 16: the workgroup stages a 64x16 slice of a and
// a 16x64 slice of b in workgroup memory (each invocation loads 4 elements of each,
// consecutive invocations reading consecutive addresses when the operand is row-major), then
// every invocation reads its 4 rows and 4 columns as vec4s. Out-of-range elements load as 0.

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

// k-major: element (k, r) of the a tile at k * TM + r, so a vec4 covers 4 rows.
var<workgroup> tile_a: array<vec4<f32>, 256>;
var<workgroup> tile_b: array<vec4<f32>, 256>;

@compute @workgroup_size(16, 16)
fn matmul_tiled_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                    @builtin(local_invocation_index) lindex: u32) {
    let z = p.z_base + wid.z;
    let bases = batch_bases(z, p.batch_rank);
    let base_a = bases.x;
    let base_b = bases.y;
    let tile_row = wid.y * TM;
    let tile_col = wid.x * TN;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        // Stage a (64 rows x 16 k): element e = lindex * 4 + j, k fastest.
        for (var j = 0u; j < 4u; j += 1u) {
            let e = lindex * 4u + j;
            let r = e / TK;
            let kk = e % TK;
            let row = tile_row + r;
            let kg = k0 + kk;
            var v = 0.0;
            if (row < p.m && kg < p.k) {
                v = f32(a[base_a + row * p.a_rs + kg * p.a_cs]);
            }
            tile_a[(kk * TM + r) >> 2u][r & 3u] = v;
        }
        // Stage b (16 k x 64 columns): column fastest.
        for (var j = 0u; j < 4u; j += 1u) {
            let e = lindex * 4u + j;
            let kk = e / TN;
            let c = e % TN;
            let col = tile_col + c;
            let kg = k0 + kk;
            var v = 0.0;
            if (col < p.n && kg < p.k) {
                v = f32(b[base_b + kg * p.b_rs + col * p.b_cs]);
            }
            tile_b[(kk * TN + c) >> 2u][c & 3u] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk += 1u) {
            let av = tile_a[kk * (TM / 4u) + lid.y];
            let bv = tile_b[kk * (TN / 4u) + lid.x];
            acc0 += av.x * bv;
            acc1 += av.y * bv;
            acc2 += av.z * bv;
            acc3 += av.w * bv;
        }
        workgroupBarrier();
    }
    let row0 = tile_row + lid.y * 4u;
    let col0 = tile_col + lid.x * 4u;
    let out_base = z * p.m * p.n;
    let rows = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i += 1u) {
        let r = row0 + i;
        if (r >= p.m) {
            break;
        }
        for (var j = 0u; j < 4u; j += 1u) {
            let cc = col0 + j;
            if (cc < p.n) {
                store_out(out_base, r, cc, rows[i][j]);
            }
        }
    }
}

// ---- large-tile variant ----

// Stores 8 results of row r at columns c0, c0 + step, ..., through the epilogue.
fn store_row8(out_base: u32, r: u32, c0: u32, step: u32, lo: vec4<f32>, hi: vec4<f32>) {
    if (r >= p.m) {
        return;
    }
    let v = array<vec4<f32>, 2>(lo, hi);
    for (var j = 0u; j < 8u; j += 1u) {
        let cc = c0 + j * step;
        if (cc < p.n) {
            store_out(out_base, r, cc, v[j / 4u][j % 4u]);
        }
    }
}
//
// 16x16 invocations compute a 128x128 tile, each an 8x8 block (64 accumulators), with the k
// axis staged 8 at a time: twice the arithmetic per workgroup-memory read of the 64x64
// kernel, for large products.

const LM: u32 = 128u;
const LN: u32 = 128u;
const LK: u32 = 8u;

var<workgroup> big_a: array<vec4<f32>, 256>;
var<workgroup> big_b: array<vec4<f32>, 256>;

@compute @workgroup_size(16, 16)
fn matmul_tiled128_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                       @builtin(local_invocation_index) lindex: u32) {
    let z = p.z_base + wid.z;
    let bases = batch_bases(z, p.batch_rank);
    let base_a = bases.x;
    let base_b = bases.y;
    let tile_row = wid.y * LM;
    let tile_col = wid.x * LN;
    // Sixteen named accumulators (row i, columns 0-3 and 4-7): constant names keep them in
    // registers, where an indexed array could be placed in memory.
    var c00 = vec4<f32>(0.0); var c01 = vec4<f32>(0.0); var c10 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0); var c21 = vec4<f32>(0.0); var c30 = vec4<f32>(0.0); var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0); var c41 = vec4<f32>(0.0); var c50 = vec4<f32>(0.0); var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0); var c61 = vec4<f32>(0.0); var c70 = vec4<f32>(0.0); var c71 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k; k0 += LK) {
        for (var j = 0u; j < 4u; j += 1u) {
            // a: 128 rows x 8 k, k fastest; b: 8 k x 128 columns, column fastest.
            let e = lindex * 4u + j;
            let r = e / LK;
            let kk = e % LK;
            let row = tile_row + r;
            let ka = k0 + kk;
            var va = 0.0;
            if (row < p.m && ka < p.k) {
                va = f32(a[base_a + row * p.a_rs + ka * p.a_cs]);
            }
            big_a[(kk * LM + r) >> 2u][r & 3u] = va;
            let kb = e / LN;
            let c = e % LN;
            let col = tile_col + c;
            let kg = k0 + kb;
            var vb = 0.0;
            if (col < p.n && kg < p.k) {
                vb = f32(b[base_b + kg * p.b_rs + col * p.b_cs]);
            }
            big_b[(kb * LN + c) >> 2u][c & 3u] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < LK; kk += 1u) {
            let a0 = big_a[kk * (LM / 4u) + lid.y * 2u];
            let a1 = big_a[kk * (LM / 4u) + lid.y * 2u + 1u];
            let b0 = big_b[kk * (LN / 4u) + lid.x * 2u];
            let b1 = big_b[kk * (LN / 4u) + lid.x * 2u + 1u];
            c00 += a0.x * b0;
            c01 += a0.x * b1;
            c10 += a0.y * b0;
            c11 += a0.y * b1;
            c20 += a0.z * b0;
            c21 += a0.z * b1;
            c30 += a0.w * b0;
            c31 += a0.w * b1;
            c40 += a1.x * b0;
            c41 += a1.x * b1;
            c50 += a1.y * b0;
            c51 += a1.y * b1;
            c60 += a1.z * b0;
            c61 += a1.z * b1;
            c70 += a1.w * b0;
            c71 += a1.w * b1;
        }
        workgroupBarrier();
    }
    let row0 = tile_row + lid.y * 8u;
    let col0 = tile_col + lid.x * 8u;
    let out_base = z * p.m * p.n;
    store_row8(out_base, row0, col0, 1u, c00, c01);
    store_row8(out_base, row0 + 1u, col0, 1u, c10, c11);
    store_row8(out_base, row0 + 2u, col0, 1u, c20, c21);
    store_row8(out_base, row0 + 3u, col0, 1u, c30, c31);
    store_row8(out_base, row0 + 4u, col0, 1u, c40, c41);
    store_row8(out_base, row0 + 5u, col0, 1u, c50, c51);
    store_row8(out_base, row0 + 6u, col0, 1u, c60, c61);
    store_row8(out_base, row0 + 7u, col0, 1u, c70, c71);
}

// ---- register-only 8x8 variant ----
//
// Each invocation computes 8 rows x 8 columns (the columns 8 apart) straight from global
// memory (no workgroup memory, no barriers): 64 multiply-adds per 16 loads, neighbouring
// invocations on neighbouring columns. Suits CPU-based adapters, where barriers are costly;
// a workgroup of 8x8 invocations covers a 64x64 tile.

@compute @workgroup_size(8, 8)
fn matmul_reg8_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let z = p.z_base + wid.z;
    let bases = batch_bases(z, p.batch_rank);
    // Rows row0..row0+7; columns col0, col0 + 8, ..., col0 + 56, so that neighbouring
    // invocations read and write neighbouring columns.
    let row0 = (wid.y * 8u + lid.y) * 8u;
    let col0 = wid.x * 64u + lid.x;
    if (row0 >= p.m || col0 >= p.n) {
        return;
    }
    var ra0: vec4<u32>;
    var ra1: vec4<u32>;
    var cb0: vec4<u32>;
    var cb1: vec4<u32>;
    for (var i = 0u; i < 4u; i += 1u) {
        ra0[i] = bases.x + min(row0 + i, p.m - 1u) * p.a_rs;
        ra1[i] = bases.x + min(row0 + 4u + i, p.m - 1u) * p.a_rs;
        cb0[i] = bases.y + min(col0 + 8u * i, p.n - 1u) * p.b_cs;
        cb1[i] = bases.y + min(col0 + 8u * (4u + i), p.n - 1u) * p.b_cs;
    }
    var c00 = vec4<f32>(0.0); var c01 = vec4<f32>(0.0); var c10 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0); var c21 = vec4<f32>(0.0); var c30 = vec4<f32>(0.0); var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0); var c41 = vec4<f32>(0.0); var c50 = vec4<f32>(0.0); var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0); var c61 = vec4<f32>(0.0); var c70 = vec4<f32>(0.0); var c71 = vec4<f32>(0.0);
    for (var kk = 0u; kk < p.k; kk += 1u) {
        let ka = kk * p.a_cs;
        let kb = kk * p.b_rs;
        let b0 = vec4<f32>(f32(b[cb0.x + kb]), f32(b[cb0.y + kb]), f32(b[cb0.z + kb]), f32(b[cb0.w + kb]));
        let b1 = vec4<f32>(f32(b[cb1.x + kb]), f32(b[cb1.y + kb]), f32(b[cb1.z + kb]), f32(b[cb1.w + kb]));
        let a0 = vec4<f32>(f32(a[ra0.x + ka]), f32(a[ra0.y + ka]), f32(a[ra0.z + ka]), f32(a[ra0.w + ka]));
        let a1 = vec4<f32>(f32(a[ra1.x + ka]), f32(a[ra1.y + ka]), f32(a[ra1.z + ka]), f32(a[ra1.w + ka]));
        c00 += a0.x * b0; c01 += a0.x * b1;
        c10 += a0.y * b0; c11 += a0.y * b1;
        c20 += a0.z * b0; c21 += a0.z * b1;
        c30 += a0.w * b0; c31 += a0.w * b1;
        c40 += a1.x * b0; c41 += a1.x * b1;
        c50 += a1.y * b0; c51 += a1.y * b1;
        c60 += a1.z * b0; c61 += a1.z * b1;
        c70 += a1.w * b0; c71 += a1.w * b1;
    }
    let out_base = z * p.m * p.n;
    store_row8(out_base, row0, col0, 8u, c00, c01);
    store_row8(out_base, row0 + 1u, col0, 8u, c10, c11);
    store_row8(out_base, row0 + 2u, col0, 8u, c20, c21);
    store_row8(out_base, row0 + 3u, col0, 8u, c30, c31);
    store_row8(out_base, row0 + 4u, col0, 8u, c40, c41);
    store_row8(out_base, row0 + 5u, col0, 8u, c50, c51);
    store_row8(out_base, row0 + 6u, col0, 8u, c60, c61);
    store_row8(out_base, row0 + 7u, col0, 8u, c70, c71);
}

// ---- aligned large-tile variant, double-buffered ----
//
// 16x16 invocations compute a 128x128 tile, each 8 rows x 8 columns split in two groups 64
// apart (rows 4ty..4ty+3 and 64+4ty..64+4ty+3, likewise columns), so that neighbouring
// invocations read neighbouring vec4s of workgroup memory. The k axis advances 8 at a time.
// Each invocation reads one vec4 of a and one of b per step from global memory, and reads
// the next step's pair before computing on the current one, which sits in the other half of
// the double-buffered workgroup tiles: one barrier per step. For aligned operands only, in
// the three layouts of matmul_vec4.wgsl (entry points matmul_t128v4_{nn,nt,tn}_fwd; the same
// alignment checks in src/ops/matmul.rs); the stores are scalar, with the full epilogue.

const XM: u32 = 128u;
const XN: u32 = 128u;
const XK: u32 = 8u;
// [stage][k][row] and [stage][k][column], as vec4s of 4 rows or columns.
var<workgroup> x_a: array<vec4<f32>, 512>;
var<workgroup> x_b: array<vec4<f32>, 512>;

// This invocation's global vec4 of a and of b for the k step at k0 (zero past k).
struct XStep {
    a: vec4<f32>,
    b: vec4<f32>,
}

fn t128_load(ta: bool, tb: bool, base: vec2<u32>, tile_row: u32, tile_col: u32, k0: u32, t: u32) -> XStep {
    var s: XStep;
    if (ta) {
        // a^T is (k, m) row-major: k0 + t / 32, rows 4 (t % 32) .. + 3.
        let kg = k0 + t / 32u;
        let r = min(tile_row + 4u * (t % 32u), p.m - 4u);
        if (kg < p.k) {
            s.a = vec4<f32>(a4[(base.x + kg * p.a_cs + r) / 4u]);
        }
    } else {
        // a is (m, k) row-major: row t / 2, k0 + 4 (t % 2) .. + 3.
        let r = min(tile_row + t / 2u, p.m - 1u);
        let kg = k0 + 4u * (t % 2u);
        if (kg < p.k) {
            s.a = vec4<f32>(a4[(base.x + r * p.a_rs + kg) / 4u]);
        }
    }
    if (tb) {
        // b^T is (n, k) row-major: column t / 2, k0 + 4 (t % 2) .. + 3.
        let c = min(tile_col + t / 2u, p.n - 1u);
        let kg = k0 + 4u * (t % 2u);
        if (kg < p.k) {
            s.b = vec4<f32>(b4[(base.y + c * p.b_cs + kg) / 4u]);
        }
    } else {
        // b is (k, n) row-major: k0 + t / 32, columns 4 (t % 32) .. + 3.
        let kg = k0 + t / 32u;
        let c = min(tile_col + 4u * (t % 32u), p.n - 4u);
        if (kg < p.k) {
            s.b = vec4<f32>(b4[(base.y + kg * p.b_rs + c) / 4u]);
        }
    }
    return s;
}

// Writes a step's vec4s into stage `st` of the workgroup tiles.
fn t128_stage(ta: bool, tb: bool, s: XStep, st: u32, t: u32) {
    let at = st * (XK * XM / 4u);
    if (ta) {
        x_a[at + (t / 32u) * (XM / 4u) + t % 32u] = s.a;
    } else {
        let r = t / 2u;
        let k = 4u * (t % 2u);
        for (var i = 0u; i < 4u; i += 1u) {
            x_a[at + (k + i) * (XM / 4u) + r / 4u][r % 4u] = s.a[i];
        }
    }
    if (tb) {
        let c = t / 2u;
        let k = 4u * (t % 2u);
        for (var i = 0u; i < 4u; i += 1u) {
            x_b[at + (k + i) * (XN / 4u) + c / 4u][c % 4u] = s.b[i];
        }
    } else {
        x_b[at + (t / 32u) * (XN / 4u) + t % 32u] = s.b;
    }
}

// Stores row r, columns c..c+3, through the epilogue.
fn t128_store(out_base: u32, r: u32, c: u32, v: vec4<f32>) {
    if (r >= p.m) {
        return;
    }
    for (var j = 0u; j < 4u; j += 1u) {
        let cc = c + j;
        if (cc < p.n) {
            store_out(out_base, r, cc, v[j]);
        }
    }
}

fn matmul_t128(wid: vec3<u32>, lid: vec3<u32>, t: u32, ta: bool, tb: bool) {
    let z = p.z_base + wid.z;
    let base = batch_bases(z, p.batch_rank);
    let tile_row = wid.y * XM;
    let tile_col = wid.x * XN;
    var c00 = vec4<f32>(0.0); var c01 = vec4<f32>(0.0); var c10 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0); var c21 = vec4<f32>(0.0); var c30 = vec4<f32>(0.0); var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0); var c41 = vec4<f32>(0.0); var c50 = vec4<f32>(0.0); var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0); var c61 = vec4<f32>(0.0); var c70 = vec4<f32>(0.0); var c71 = vec4<f32>(0.0);
    t128_stage(ta, tb, t128_load(ta, tb, base, tile_row, tile_col, 0u, t), 0u, t);
    workgroupBarrier();
    let steps = (p.k + XK - 1u) / XK;
    for (var s = 0u; s < steps; s += 1u) {
        let st = s % 2u;
        let more = s + 1u < steps;
        var next: XStep;
        if (more) {
            next = t128_load(ta, tb, base, tile_row, tile_col, (s + 1u) * XK, t);
        }
        let at = st * (XK * XM / 4u);
        for (var kk = 0u; kk < XK; kk += 1u) {
            let row = at + kk * (XM / 4u);
            let a0 = x_a[row + lid.y];
            let a1 = x_a[row + 16u + lid.y];
            let b0 = x_b[row + lid.x];
            let b1 = x_b[row + 16u + lid.x];
            c00 += a0.x * b0; c01 += a0.x * b1;
            c10 += a0.y * b0; c11 += a0.y * b1;
            c20 += a0.z * b0; c21 += a0.z * b1;
            c30 += a0.w * b0; c31 += a0.w * b1;
            c40 += a1.x * b0; c41 += a1.x * b1;
            c50 += a1.y * b0; c51 += a1.y * b1;
            c60 += a1.z * b0; c61 += a1.z * b1;
            c70 += a1.w * b0; c71 += a1.w * b1;
        }
        if (more) {
            t128_stage(ta, tb, next, 1u - st, t);
        }
        workgroupBarrier();
    }
    let r0 = tile_row + 4u * lid.y;
    let r1 = r0 + 64u;
    let col0 = tile_col + 4u * lid.x;
    let col1 = col0 + 64u;
    let out_base = z * p.m * p.n;
    t128_store(out_base, r0, col0, c00); t128_store(out_base, r0, col1, c01);
    t128_store(out_base, r0 + 1u, col0, c10); t128_store(out_base, r0 + 1u, col1, c11);
    t128_store(out_base, r0 + 2u, col0, c20); t128_store(out_base, r0 + 2u, col1, c21);
    t128_store(out_base, r0 + 3u, col0, c30); t128_store(out_base, r0 + 3u, col1, c31);
    t128_store(out_base, r1, col0, c40); t128_store(out_base, r1, col1, c41);
    t128_store(out_base, r1 + 1u, col0, c50); t128_store(out_base, r1 + 1u, col1, c51);
    t128_store(out_base, r1 + 2u, col0, c60); t128_store(out_base, r1 + 2u, col1, c61);
    t128_store(out_base, r1 + 3u, col0, c70); t128_store(out_base, r1 + 3u, col1, c71);
}

@compute @workgroup_size(16, 16)
fn matmul_t128v4_nn_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                        @builtin(local_invocation_index) t: u32) {
    matmul_t128(wid, lid, t, false, false);
}

@compute @workgroup_size(16, 16)
fn matmul_t128v4_nt_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                        @builtin(local_invocation_index) t: u32) {
    matmul_t128(wid, lid, t, false, true);
}

@compute @workgroup_size(16, 16)
fn matmul_t128v4_tn_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                        @builtin(local_invocation_index) t: u32) {
    matmul_t128(wid, lid, t, true, false);
}

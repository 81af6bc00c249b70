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
//             activation of the epilogue, if any: the fused tail of a linear layer)
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
    _pad0: u32,
    _pad1: u32,
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
                var v = rows[i][j];
                if ((p.epilogue & EPILOGUE_BIAS) != 0u) {
                    v += f32(bias[p.off_bias + cc]);
                }
                out[out_base + r * p.n + cc] = OUT(epilogue_activation(v, p.epilogue, p.act_alpha));
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
                var v = rows[i][j];
                if ((p.epilogue & EPILOGUE_BIAS) != 0u) {
                    v += f32(bias[p.off_bias + cc]);
                }
                out[out_base + r * p.n + cc] = OUT(epilogue_activation(v, p.epilogue, p.act_alpha));
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
            var x = v[j / 4u][j % 4u];
            if ((p.epilogue & EPILOGUE_BIAS) != 0u) {
                x += f32(bias[p.off_bias + cc]);
            }
            out[out_base + r * p.n + cc] = OUT(epilogue_activation(x, p.epilogue, p.act_alpha));
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

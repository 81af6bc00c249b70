// Convolution family (NCHW, contiguous operands): forward and both backward kernels of conv2d
// as implicit GEMMs, without a materialised im2col buffer. conv_transpose2d runs the same
// kernels with the roles swapped (its forward is conv2d_bwd_input).
//
// Shapes, per group g (workgroup_id.z), with cin_g = c_in / groups, cout_g = c_out / groups:
//   x (n, c_in, h, w), weight (c_out, cin_g, kh, kw), y (n, c_out, oh, ow)
//   oh = (h + 2 ph - dh (kh - 1) - 1) / sh + 1 (likewise ow)
//
// The register kernels compute an 8x8 block of their GEMM's output per invocation (the
// *_block functions here; their entry points and the loads of the operand that 8 neighbouring
// invocations share are in conv_reg.wgsl, or in conv_sg.wgsl through subgroups); the tiled
// ones stage 64x64 tiles in workgroup memory. Rows beyond the edge are clamped for loading and
// never stored.
//
// Bindings:
//   conv2d_fwd:        a (0) = x,      b (1) = weight, bias (2) = bias (c_out) from
//                      p.off_bias when p.epilogue asks for it, out (3) = y
//   conv2d_bwd_input:  a (0) = dy,     b (1) = weight, out (3) = dx
//   conv2d_bwd_weight: a (0) = dy,     b (1) = x,      out (3) = dweight
//   conv2d_im2col_fwd: a (0) = x;  out (3) = cols (p.im2col_rows, n, oh ow), for groups = 1
//   conv2d_col2im_bwd: a (0) = dcols, (c_in kh kw, n, oh ow) or (n, c_in kh kw, oh ow) by
//                      p.splits (its row stride) and p.chunk (its sample stride); out (3) = dx,
//                      for groups = 1
//   p (4): ConvParams (src/ops/conv.rs)

struct Params {
    n: u32,
    c_in: u32,
    h: u32,
    w: u32,
    c_out: u32,
    oh: u32,
    ow: u32,
    groups: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    dh: u32,
    dw: u32,
    row_base: u32,
    epilogue: u32,
    act_alpha: f32,
    off_bias: u32,
    splits: u32,
    chunk: u32,
    // conv2d_im2col_fwd and conv2d_col2im_bwd: 1 when every index is below 2^22 (split with
    // float division).
    small: u32,
    // conv2d_im2col_fwd: rows of the im2col matrix, c_in kh kw padded to a multiple of 4.
    im2col_rows: u32,
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

// Forward: rows are output positions (n, oy, ox), columns output channels of the group,
// the reduction runs over (ci, ky, kx). Each invocation computes 8 rows x 8 columns (16 loads
// per 64 multiply-adds); neighbouring invocations (lid.x) take neighbouring rows, so that all
// lanes are busy even with few output channels.
fn conv_x(base: u32, iy: i32, ix: i32) -> f32 {
    if (iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
        return f32(a[base + u32(iy) * p.w + u32(ix)]);
    }
    return 0.0;
}

// Stores output row r (a position), channels col0..col0+7 of group g, through the epilogue.
fn conv_store8(r: u32, rows: u32, g: u32, cout_g: u32, col0: u32, lo: vec4<f32>, hi: vec4<f32>) {
    if (r >= rows) {
        return;
    }
    let oplane = p.oh * p.ow;
    let nn = r / oplane;
    let rem = r - nn * oplane;
    let v = array<vec4<f32>, 2>(lo, hi);
    for (var j = 0u; j < 8u; j += 1u) {
        let c = col0 + j;
        if (c < cout_g) {
            var x = v[j / 4u][j % 4u];
            if ((p.epilogue & EPILOGUE_BIAS) != 0u) {
                x += f32(bias[p.off_bias + g * cout_g + c]);
            }
            out[(nn * p.c_out + g * cout_g + c) * oplane + rem] = OUT(epilogue_activation(x, p.epilogue, p.act_alpha));
        }
    }
}

// The block of rows row0..row0+7, columns col0..col0+7 of group g (col0 in range; rows past
// the end are computed clamped and not stored). `lane` is this invocation's lane in a group
// of 8 that share col0, for load8_b (conv_reg.wgsl or conv_sg.wgsl, whichever the module has).
fn conv_fwd_block(g: u32, row0: u32, col0: u32, lane: u32) {
    let cin_g = p.c_in / p.groups;
    let cout_g = p.c_out / p.groups;
    let rows = p.n * p.oh * p.ow;
    let plane = p.h * p.w;
    let ksize = p.kh * p.kw;
    let oplane = p.oh * p.ow;
    // Rows row0..row0+3 in the "a" vectors, row0+4..row0+7 in the "b" vectors.
    var xba: vec4<u32>; var xbb: vec4<u32>;
    var iya: vec4<i32>; var iyb: vec4<i32>;
    var ixa: vec4<i32>; var ixb: vec4<i32>;
    for (var i = 0u; i < 4u; i += 1u) {
        for (var h = 0u; h < 2u; h += 1u) {
            let r = min(row0 + 4u * h + i, rows - 1u);
            let nn = r / oplane;
            let rem = r - nn * oplane;
            let oy = rem / p.ow;
            let base = (nn * p.c_in + g * cin_g) * plane;
            let iy = i32(oy * p.sh) - i32(p.ph);
            let ix = i32((rem - oy * p.ow) * p.sw) - i32(p.pw);
            if (h == 0u) {
                xba[i] = base; iya[i] = iy; ixa[i] = ix;
            } else {
                xbb[i] = base; iyb[i] = iy; ixb[i] = ix;
            }
        }
    }
    var wba: vec4<u32>; var wbb: vec4<u32>;
    for (var j = 0u; j < 4u; j += 1u) {
        wba[j] = (g * cout_g + min(col0 + j, cout_g - 1u)) * cin_g * ksize;
        wbb[j] = (g * cout_g + min(col0 + 4u + j, cout_g - 1u)) * cin_g * ksize;
    }
    let wbl = select(wba, wbb, lane >= 4u)[lane & 3u];
    var c00 = vec4<f32>(0.0); var c01 = vec4<f32>(0.0); var c10 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0); var c21 = vec4<f32>(0.0); var c30 = vec4<f32>(0.0); var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0); var c41 = vec4<f32>(0.0); var c50 = vec4<f32>(0.0); var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0); var c61 = vec4<f32>(0.0); var c70 = vec4<f32>(0.0); var c71 = vec4<f32>(0.0);
    for (var ci = 0u; ci < cin_g; ci += 1u) {
        let xa = xba + ci * plane;
        let xb = xbb + ci * plane;
        for (var ky = 0u; ky < p.kh; ky += 1u) {
            let ya = iya + i32(ky * p.dh);
            let yb = iyb + i32(ky * p.dh);
            for (var kx = 0u; kx < p.kw; kx += 1u) {
                let xxa = ixa + i32(kx * p.dw);
                let xxb = ixb + i32(kx * p.dw);
                let k = ci * ksize + ky * p.kw + kx;
                let w = load8_b(wba, wbb, wbl, k);
                let w0 = w[0];
                let w1 = w[1];
                let a0 = vec4<f32>(conv_x(xa.x, ya.x, xxa.x), conv_x(xa.y, ya.y, xxa.y),
                    conv_x(xa.z, ya.z, xxa.z), conv_x(xa.w, ya.w, xxa.w));
                let a1 = vec4<f32>(conv_x(xb.x, yb.x, xxb.x), conv_x(xb.y, yb.y, xxb.y),
                    conv_x(xb.z, yb.z, xxb.z), conv_x(xb.w, yb.w, xxb.w));
                c00 += a0.x * w0; c01 += a0.x * w1;
                c10 += a0.y * w0; c11 += a0.y * w1;
                c20 += a0.z * w0; c21 += a0.z * w1;
                c30 += a0.w * w0; c31 += a0.w * w1;
                c40 += a1.x * w0; c41 += a1.x * w1;
                c50 += a1.y * w0; c51 += a1.y * w1;
                c60 += a1.z * w0; c61 += a1.z * w1;
                c70 += a1.w * w0; c71 += a1.w * w1;
            }
        }
    }
    conv_store8(row0, rows, g, cout_g, col0, c00, c01);
    conv_store8(row0 + 1u, rows, g, cout_g, col0, c10, c11);
    conv_store8(row0 + 2u, rows, g, cout_g, col0, c20, c21);
    conv_store8(row0 + 3u, rows, g, cout_g, col0, c30, c31);
    conv_store8(row0 + 4u, rows, g, cout_g, col0, c40, c41);
    conv_store8(row0 + 5u, rows, g, cout_g, col0, c50, c51);
    conv_store8(row0 + 6u, rows, g, cout_g, col0, c60, c61);
    conv_store8(row0 + 7u, rows, g, cout_g, col0, c70, c71);
}

// Gradient of the input: rows are input positions (n, iy, ix), columns input channels of the
// group; the reduction runs over (co, ky, kx) for which iy = oy sh - ph + ky dh has an
// integral oy in range (and likewise for x). 8 rows x 8 columns per invocation, neighbouring
// invocations (lid.x) on neighbouring rows, as in conv2d_fwd.
fn div_exact4(t: vec4<i32>, s: u32) -> vec4<u32> {
    return vec4<u32>(div_exact(t.x, s), div_exact(t.y, s), div_exact(t.z, s), div_exact(t.w, s));
}

// dy at output position (oy, ox) from `base`, or 0 outside the output.
fn conv_dy(base: u32, oy: u32, ox: u32) -> f32 {
    if (oy < p.oh && ox < p.ow) {
        return f32(a[base + oy * p.ow + ox]);
    }
    return 0.0;
}

// Stores input-gradient row r (a position), channels col0..col0+7 of group g.
fn conv_store_dx8(r: u32, rows: u32, g: u32, cin_g: u32, col0: u32, lo: vec4<f32>, hi: vec4<f32>) {
    if (r >= rows) {
        return;
    }
    let plane = p.h * p.w;
    let nn = r / plane;
    let rem = r - nn * plane;
    let v = array<vec4<f32>, 2>(lo, hi);
    for (var j = 0u; j < 8u; j += 1u) {
        let c = col0 + j;
        if (c < cin_g) {
            out[(nn * p.c_in + g * cin_g + c) * plane + rem] = OUT(v[j / 4u][j % 4u]);
        }
    }
}

// The block of rows row0..row0+7, columns col0..col0+7 of group g, as conv_fwd_block.
fn conv_bwd_input_block(g: u32, row0: u32, col0: u32, lane: u32) {
    let cin_g = p.c_in / p.groups;
    let cout_g = p.c_out / p.groups;
    let rows = p.n * p.h * p.w;
    let plane = p.h * p.w;
    let oplane = p.oh * p.ow;
    let ksize = p.kh * p.kw;
    // Rows row0..row0+3 in the "a" vectors, row0+4..row0+7 in the "b" vectors.
    var dba: vec4<u32>; var dbb: vec4<u32>;
    var tya: vec4<i32>; var tyb: vec4<i32>;
    var txa: vec4<i32>; var txb: vec4<i32>;
    for (var i = 0u; i < 4u; i += 1u) {
        for (var h = 0u; h < 2u; h += 1u) {
            let r = min(row0 + 4u * h + i, rows - 1u);
            let nn = r / plane;
            let rem = r - nn * plane;
            let iy = rem / p.w;
            let base = (nn * p.c_out + g * cout_g) * oplane;
            let ty = i32(iy) + i32(p.ph);
            let tx = i32(rem - iy * p.w) + i32(p.pw);
            if (h == 0u) {
                dba[i] = base; tya[i] = ty; txa[i] = tx;
            } else {
                dbb[i] = base; tyb[i] = ty; txb[i] = tx;
            }
        }
    }
    // Weight rows (co, ci) start at ((g cout_g + co) cin_g + ci) ksize.
    var cia: vec4<u32>; var cib: vec4<u32>;
    for (var j = 0u; j < 4u; j += 1u) {
        cia[j] = min(col0 + j, cin_g - 1u) * ksize;
        cib[j] = min(col0 + 4u + j, cin_g - 1u) * ksize;
    }
    let cil = select(cia, cib, lane >= 4u)[lane & 3u];
    var c00 = vec4<f32>(0.0); var c01 = vec4<f32>(0.0); var c10 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0); var c21 = vec4<f32>(0.0); var c30 = vec4<f32>(0.0); var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0); var c41 = vec4<f32>(0.0); var c50 = vec4<f32>(0.0); var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0); var c61 = vec4<f32>(0.0); var c70 = vec4<f32>(0.0); var c71 = vec4<f32>(0.0);
    for (var ky = 0u; ky < p.kh; ky += 1u) {
        let oya = div_exact4(tya - i32(ky * p.dh), p.sh);
        let oyb = div_exact4(tyb - i32(ky * p.dh), p.sh);
        for (var kx = 0u; kx < p.kw; kx += 1u) {
            let oxa = div_exact4(txa - i32(kx * p.dw), p.sw);
            let oxb = div_exact4(txb - i32(kx * p.dw), p.sw);
            let koff = ky * p.kw + kx;
            for (var co = 0u; co < cout_g; co += 1u) {
                let wrow = (g * cout_g + co) * cin_g * ksize + koff;
                let w = load8_b(cia, cib, cil, wrow);
                let w0 = w[0];
                let w1 = w[1];
                let da = dba + co * oplane;
                let db = dbb + co * oplane;
                let a0 = vec4<f32>(conv_dy(da.x, oya.x, oxa.x), conv_dy(da.y, oya.y, oxa.y),
                    conv_dy(da.z, oya.z, oxa.z), conv_dy(da.w, oya.w, oxa.w));
                let a1 = vec4<f32>(conv_dy(db.x, oyb.x, oxb.x), conv_dy(db.y, oyb.y, oxb.y),
                    conv_dy(db.z, oyb.z, oxb.z), conv_dy(db.w, oyb.w, oxb.w));
                c00 += a0.x * w0; c01 += a0.x * w1;
                c10 += a0.y * w0; c11 += a0.y * w1;
                c20 += a0.z * w0; c21 += a0.z * w1;
                c30 += a0.w * w0; c31 += a0.w * w1;
                c40 += a1.x * w0; c41 += a1.x * w1;
                c50 += a1.y * w0; c51 += a1.y * w1;
                c60 += a1.z * w0; c61 += a1.z * w1;
                c70 += a1.w * w0; c71 += a1.w * w1;
            }
        }
    }
    conv_store_dx8(row0, rows, g, cin_g, col0, c00, c01);
    conv_store_dx8(row0 + 1u, rows, g, cin_g, col0, c10, c11);
    conv_store_dx8(row0 + 2u, rows, g, cin_g, col0, c20, c21);
    conv_store_dx8(row0 + 3u, rows, g, cin_g, col0, c30, c31);
    conv_store_dx8(row0 + 4u, rows, g, cin_g, col0, c40, c41);
    conv_store_dx8(row0 + 5u, rows, g, cin_g, col0, c50, c51);
    conv_store_dx8(row0 + 6u, rows, g, cin_g, col0, c60, c61);
    conv_store_dx8(row0 + 7u, rows, g, cin_g, col0, c70, c71);
}

// Gradient of the weight: rows are output channels of the group, columns (ci, ky, kx); the
// reduction runs over the output positions (n, oy, ox). workgroup_id.z = g * p.splits + s:
// split s sums positions [s * p.chunk, (s + 1) * p.chunk) into slice s of out
// (p.splits, c_out, cin_g * kh * kw); the launch code adds the slices up. 8x8 per invocation.
fn conv_xw(base: u32, iy: i32, ix: i32) -> f32 {
    if (iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
        return f32(b[base + u32(iy) * p.w + u32(ix)]);
    }
    return 0.0;
}

// The block of rows row0..row0+7 (row0 in range), columns col0..col0+7 of split `split` of
// group g; columns past the end are computed clamped and not stored. `lane` as in
// conv_fwd_block, for load8_a (lanes that share row0).
fn conv_bwd_weight_block(g: u32, split: u32, row0: u32, col0: u32, lane: u32) {
    let cin_g = p.c_in / p.groups;
    let cout_g = p.c_out / p.groups;
    let ksize = p.kh * p.kw;
    let cols = cin_g * ksize;
    let plane = p.h * p.w;
    let oplane = p.oh * p.ow;
    // Columns col0..col0+3 in the "a" vectors, col0+4..col0+7 in the "b" vectors.
    var xoa: vec4<u32>; var xob: vec4<u32>;
    var kya: vec4<i32>; var kyb: vec4<i32>;
    var kxa: vec4<i32>; var kxb: vec4<i32>;
    for (var j = 0u; j < 4u; j += 1u) {
        for (var h = 0u; h < 2u; h += 1u) {
            let c = min(col0 + 4u * h + j, cols - 1u);
            let ci = c / ksize;
            let kk = c - ci * ksize;
            let ky = kk / p.kw;
            let xo = (g * cin_g + ci) * plane;
            let y = i32(ky * p.dh) - i32(p.ph);
            let x = i32((kk - ky * p.kw) * p.dw) - i32(p.pw);
            if (h == 0u) {
                xoa[j] = xo; kya[j] = y; kxa[j] = x;
            } else {
                xob[j] = xo; kyb[j] = y; kxb[j] = x;
            }
        }
    }
    var dya: vec4<u32>; var dyb: vec4<u32>;
    for (var i = 0u; i < 4u; i += 1u) {
        dya[i] = (g * cout_g + min(row0 + i, cout_g - 1u)) * oplane;
        dyb[i] = (g * cout_g + min(row0 + 4u + i, cout_g - 1u)) * oplane;
    }
    let dyl = select(dya, dyb, lane >= 4u)[lane & 3u];
    var c00 = vec4<f32>(0.0); var c01 = vec4<f32>(0.0); var c10 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0); var c21 = vec4<f32>(0.0); var c30 = vec4<f32>(0.0); var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0); var c41 = vec4<f32>(0.0); var c50 = vec4<f32>(0.0); var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0); var c61 = vec4<f32>(0.0); var c70 = vec4<f32>(0.0); var c71 = vec4<f32>(0.0);
    let q0 = split * p.chunk;
    let q1 = min(q0 + p.chunk, p.n * oplane);
    // Position q = (nn, oy, ox), stepped with carries rather than divided out each time
    // (integer division by a non-constant runs one lane at a time on CPU adapters).
    var nn = q0 / oplane;
    var o = q0 % oplane;
    var oy = o / p.ow;
    var ox = o % p.ow;
    for (var q = q0; q < q1; q += 1u) {
        let dyq = nn * p.c_out * oplane + o;
        let xn = nn * p.c_in * plane;
        let d = load8_a(dya, dyb, dyl, dyq);
        let a0 = d[0];
        let a1 = d[1];
        let ya = i32(oy * p.sh) + kya;
        let yb = i32(oy * p.sh) + kyb;
        let xa = i32(ox * p.sw) + kxa;
        let xb = i32(ox * p.sw) + kxb;
        let w0 = vec4<f32>(conv_xw(xn + xoa.x, ya.x, xa.x), conv_xw(xn + xoa.y, ya.y, xa.y),
            conv_xw(xn + xoa.z, ya.z, xa.z), conv_xw(xn + xoa.w, ya.w, xa.w));
        let w1 = vec4<f32>(conv_xw(xn + xob.x, yb.x, xb.x), conv_xw(xn + xob.y, yb.y, xb.y),
            conv_xw(xn + xob.z, yb.z, xb.z), conv_xw(xn + xob.w, yb.w, xb.w));
        c00 += a0.x * w0; c01 += a0.x * w1;
        c10 += a0.y * w0; c11 += a0.y * w1;
        c20 += a0.z * w0; c21 += a0.z * w1;
        c30 += a0.w * w0; c31 += a0.w * w1;
        c40 += a1.x * w0; c41 += a1.x * w1;
        c50 += a1.y * w0; c51 += a1.y * w1;
        c60 += a1.z * w0; c61 += a1.z * w1;
        c70 += a1.w * w0; c71 += a1.w * w1;
        o += 1u;
        ox += 1u;
        let row_end = ox == p.ow;
        ox = select(ox, 0u, row_end);
        oy = select(oy, oy + 1u, row_end);
        let plane_end = o == oplane;
        o = select(o, 0u, plane_end);
        oy = select(oy, 0u, plane_end);
        nn = select(nn, nn + 1u, plane_end);
    }
    let out_base = split * p.c_out + g * cout_g;
    conv_store_dw8(out_base, row0, cout_g, cols, col0, c00, c01);
    conv_store_dw8(out_base, row0 + 1u, cout_g, cols, col0, c10, c11);
    conv_store_dw8(out_base, row0 + 2u, cout_g, cols, col0, c20, c21);
    conv_store_dw8(out_base, row0 + 3u, cout_g, cols, col0, c30, c31);
    conv_store_dw8(out_base, row0 + 4u, cout_g, cols, col0, c40, c41);
    conv_store_dw8(out_base, row0 + 5u, cout_g, cols, col0, c50, c51);
    conv_store_dw8(out_base, row0 + 6u, cout_g, cols, col0, c60, c61);
    conv_store_dw8(out_base, row0 + 7u, cout_g, cols, col0, c70, c71);
}

// Stores weight-gradient row r (an output channel), columns col0..col0+7.
fn conv_store_dw8(out_base: u32, r: u32, cout_g: u32, cols: u32, col0: u32, lo: vec4<f32>, hi: vec4<f32>) {
    if (r >= cout_g) {
        return;
    }
    let v = array<vec4<f32>, 2>(lo, hi);
    for (var j = 0u; j < 8u; j += 1u) {
        let c = col0 + j;
        if (c < cols) {
            out[(out_base + r) * cols + c] = OUT(v[j / 4u][j % 4u]);
        }
    }
}

// The shared-memory tiled kernels (conv2d_bwd_weight_tiled, conv2d_tiled_fwd,
// conv2d_bwd_input_tiled): a workgroup of 16x16 computes a 64x64 tile of its GEMM, staging 16
// steps of the reduction at a time. Each invocation stages row/column `own` = lindex / 4 of
// both tiles at steps kk = (lindex % 4) * 4 + 0..3 (tile_stage), then every invocation adds
// its 4x4 block of their product (tile_step). The kernels differ only in what they load and
// where they store.

var<workgroup> tile_a: array<vec4<f32>, 256>;
var<workgroup> tile_b: array<vec4<f32>, 256>;

// Stages va at row `own`, step kk of the A tile and vb at column `own`, step kk of the B tile.
fn tile_stage(kk: u32, own: u32, va: f32, vb: f32) {
    tile_a[(kk * 64u + own) >> 2u][own & 3u] = va;
    tile_b[(kk * 64u + own) >> 2u][own & 3u] = vb;
}

// acc (rows lid.y * 4 + 0..3, columns lid.x * 4 + 0..3 of the tile) plus the product of the
// staged tiles; waits for the staging first and for every invocation's reads after.
fn tile_step(acc: array<vec4<f32>, 4>, lid: vec3<u32>) -> array<vec4<f32>, 4> {
    workgroupBarrier();
    var c = acc;
    for (var kk = 0u; kk < 16u; kk += 1u) {
        let av = tile_a[kk * 16u + lid.y];
        let bv = tile_b[kk * 16u + lid.x];
        c[0] += av.x * bv;
        c[1] += av.y * bv;
        c[2] += av.z * bv;
        c[3] += av.w * bv;
    }
    workgroupBarrier();
    return c;
}

// Gradient of the weight as a shared-memory tiled GEMM: out (c_out, cin_g * kh * kw) of group
// g = dy (c_out, positions) x im2col(x) (positions, cin_g * kh * kw). A workgroup of 16x16
// computes a 64x64 tile, staging 16 positions at a time; consecutive invocations load
// consecutive positions, so reads of dy and x are contiguous along the output row. Splits
// of the positions work as in conv2d_bwd_weight.

@compute @workgroup_size(16, 16)
fn conv2d_bwd_weight_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                           @builtin(local_invocation_index) lindex: u32) {
    let g = wid.z / p.splits;
    let split = wid.z % p.splits;
    let cin_g = p.c_in / p.groups;
    let cout_g = p.c_out / p.groups;
    let ksize = p.kh * p.kw;
    let cols = cin_g * ksize;
    let plane = p.h * p.w;
    let oplane = p.oh * p.ow;
    let tile_row = wid.y * 64u;
    let tile_col = wid.x * 64u;
    let q_start = split * p.chunk;
    let q_end = min(q_start + p.chunk, p.n * oplane);
    // This invocation stages row/column lindex / 4 of the tiles, 4 positions of each.
    let own = lindex / 4u;
    let co = tile_row + own;
    let col = tile_col + own;
    let ci = min(col, cols - 1u) / ksize;
    let kk2 = min(col, cols - 1u) % ksize;
    let ky = i32((kk2 / p.kw) * p.dh) - i32(p.ph);
    let kx = i32((kk2 % p.kw) * p.dw) - i32(p.pw);
    var acc = array<vec4<f32>, 4>();
    for (var k0 = q_start; k0 < q_end; k0 += 16u) {
        // This invocation's first position of the step, (nb, ob); the next three follow with
        // carries, so that one integer division serves four elements.
        let qb = k0 + (lindex % 4u) * 4u;
        let nb = qb / oplane;
        let ob = qb - nb * oplane;
        for (var j = 0u; j < 4u; j += 1u) {
            let kk = (lindex % 4u) * 4u + j;
            let q = k0 + kk;
            var va = 0.0;
            var vb = 0.0;
            if (q < q_end) {
                var nn = nb;
                var o = ob + j;
                while (o >= oplane) {
                    o -= oplane;
                    nn += 1u;
                }
                if (co < cout_g) {
                    va = f32(a[(nn * p.c_out + g * cout_g + co) * oplane + o]);
                }
                let oy = div_small(o, p.ow);
                let iy = i32(oy * p.sh) + ky;
                let ix = i32((o - oy * p.ow) * p.sw) + kx;
                if (col < cols && iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                    vb = f32(b[(nn * p.c_in + g * cin_g + ci) * plane + u32(iy) * p.w + u32(ix)]);
                }
            }
            tile_stage(kk, own, va, vb);
        }
        acc = tile_step(acc, lid);
    }
    let res = acc;
    for (var i = 0u; i < 4u; i += 1u) {
        let r = tile_row + lid.y * 4u + i;
        if (r >= cout_g) {
            break;
        }
        for (var jj = 0u; jj < 4u; jj += 1u) {
            let c = tile_col + lid.x * 4u + jj;
            if (c < cols) {
                out[(split * p.c_out + g * cout_g + r) * cols + c] = OUT(res[i][jj]);
            }
        }
    }
}

// Forward as a shared-memory tiled implicit GEMM: rows are output positions (n, oy, ox),
// columns output channels of group g = workgroup_id.z, the reduction runs over
// (ci, ky, kx) 16 at a time. A workgroup of 16x16 computes a 64x64 tile; each invocation
// stages one row of the im2col tile and one column of the weight tile (4 k each), then
// computes a 4x4 block from workgroup memory. Same bindings and epilogue as conv2d_fwd.

@compute @workgroup_size(16, 16)
fn conv2d_tiled_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                    @builtin(local_invocation_index) lindex: u32) {
    let g = wid.z;
    let cin_g = p.c_in / p.groups;
    let cout_g = p.c_out / p.groups;
    let rows = p.n * p.oh * p.ow;
    let plane = p.h * p.w;
    let oplane = p.oh * p.ow;
    let ksize = p.kh * p.kw;
    let kdim = cin_g * ksize;
    let tile_row = p.row_base + wid.y * 64u;
    let tile_col = wid.x * 64u;
    let own = lindex / 4u;
    // The output position this invocation stages.
    let srow = min(tile_row + own, rows - 1u);
    let sn = srow / oplane;
    let so = srow % oplane;
    let iy0 = i32((so / p.ow) * p.sh) - i32(p.ph);
    let ix0 = i32((so % p.ow) * p.sw) - i32(p.pw);
    let xbase = (sn * p.c_in + g * cin_g) * plane;
    // The output channel (weight row) this invocation stages.
    let scol = tile_col + own;
    let wbase = (g * cout_g + min(scol, cout_g - 1u)) * kdim;
    var acc = array<vec4<f32>, 4>();
    for (var k0 = 0u; k0 < kdim; k0 += 16u) {
        for (var j = 0u; j < 4u; j += 1u) {
            let kk = (lindex % 4u) * 4u + j;
            let k = k0 + kk;
            var va = 0.0;
            var vb = 0.0;
            if (k < kdim) {
                let ci = div_small(k, ksize);
                let r = k - ci * ksize;
                let ky = div_small(r, p.kw);
                let iy = iy0 + i32(ky * p.dh);
                let ix = ix0 + i32((r - ky * p.kw) * p.dw);
                if (tile_row + own < rows && iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                    va = f32(a[xbase + ci * plane + u32(iy) * p.w + u32(ix)]);
                }
                if (scol < cout_g) {
                    vb = f32(b[wbase + k]);
                }
            }
            tile_stage(kk, own, va, vb);
        }
        acc = tile_step(acc, lid);
    }
    let res = acc;
    for (var i = 0u; i < 4u; i += 1u) {
        let r = tile_row + lid.y * 4u + i;
        if (r >= rows) {
            break;
        }
        let nn = r / oplane;
        let o = r % oplane;
        for (var jj = 0u; jj < 4u; jj += 1u) {
            let c = tile_col + lid.x * 4u + jj;
            if (c < cout_g) {
                var v = res[i][jj];
                if ((p.epilogue & EPILOGUE_BIAS) != 0u) {
                    v += f32(bias[p.off_bias + g * cout_g + c]);
                }
                out[(nn * p.c_out + g * cout_g + c) * oplane + o] = OUT(epilogue_activation(v, p.epilogue, p.act_alpha));
            }
        }
    }
}

// Gradient of the input as a shared-memory tiled GEMM: rows are input positions (n, iy, ix),
// columns input channels of group g = workgroup_id.z, the reduction runs over (co, ky, kx)
// 16 at a time, taking dy at oy = (iy + ph - ky dh) / sh when that divides exactly and lands
// in range (likewise for x). Same bindings as conv2d_bwd_input; 64x64 tiles as conv2d_tiled_fwd.

@compute @workgroup_size(16, 16)
fn conv2d_bwd_input_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                          @builtin(local_invocation_index) lindex: u32) {
    let g = wid.z;
    let cin_g = p.c_in / p.groups;
    let cout_g = p.c_out / p.groups;
    let rows = p.n * p.h * p.w;
    let plane = p.h * p.w;
    let oplane = p.oh * p.ow;
    let ksize = p.kh * p.kw;
    let kdim = cout_g * ksize;
    let tile_row = p.row_base + wid.y * 64u;
    let tile_col = wid.x * 64u;
    let own = lindex / 4u;
    let srow = min(tile_row + own, rows - 1u);
    let sn = srow / plane;
    let sp = srow % plane;
    let ty0 = i32(sp / p.w) + i32(p.ph);
    let tx0 = i32(sp % p.w) + i32(p.pw);
    let dybase = (sn * p.c_out + g * cout_g) * oplane;
    let scol = tile_col + own;
    let ci = min(scol, cin_g - 1u);
    var acc = array<vec4<f32>, 4>();
    for (var k0 = 0u; k0 < kdim; k0 += 16u) {
        for (var j = 0u; j < 4u; j += 1u) {
            let kk = (lindex % 4u) * 4u + j;
            let k = k0 + kk;
            var va = 0.0;
            var vb = 0.0;
            if (k < kdim) {
                let co = div_small(k, ksize);
                let r = k - co * ksize;
                let ky = div_small(r, p.kw);
                let kx = r - ky * p.kw;
                let ty = ty0 - i32(ky * p.dh);
                let tx = tx0 - i32(kx * p.dw);
                let oy = div_exact(ty, p.sh);
                let ox = div_exact(tx, p.sw);
                if (tile_row + own < rows && oy < p.oh && ox < p.ow) {
                    va = f32(a[dybase + co * oplane + oy * p.ow + ox]);
                }
                if (scol < cin_g) {
                    vb = f32(b[((g * cout_g + co) * cin_g + ci) * ksize + r]);
                }
            }
            tile_stage(kk, own, va, vb);
        }
        acc = tile_step(acc, lid);
    }
    let res = acc;
    for (var i = 0u; i < 4u; i += 1u) {
        let r = tile_row + lid.y * 4u + i;
        if (r >= rows) {
            break;
        }
        let nn = r / plane;
        let o = r % plane;
        for (var jj = 0u; jj < 4u; jj += 1u) {
            let c = tile_col + lid.x * 4u + jj;
            if (c < cin_g) {
                out[(nn * p.c_in + g * cin_g + c) * plane + o] = OUT(res[i][jj]);
            }
        }
    }
}

// k / d, in float arithmetic where p.small says that it is exact (see div_small).
fn im2col_div(k: u32, d: u32) -> u32 {
    if (p.small != 0u) {
        return div_below_2_22(k, d);
    }
    return k / d;
}

// The im2col matrix of x for groups = 1: cols[(ci, ky, kx), nn, (oy, ox)] is the input
// element under kernel tap (ky, kx) of output position (oy, ox) of sample nn, 0 in the
// padding. src/ops/conv.rs multiplies it by the weight (one product over every sample) where
// that beats the implicit-GEMM kernels; it asks for oh * ow a multiple of 4, so that each
// invocation writes four neighbouring positions as one vec4, with one index split for four.
@group(0) @binding(3) var<storage, read_write> out4: array<vec4<OUT>>;

@compute @workgroup_size(256)
fn conv2d_im2col_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    let taps = p.kh * p.kw;
    let plane = p.oh * p.ow;
    let per_row = p.n * plane;
    if (i >= p.im2col_rows * per_row / 4u) { return; }
    let first = 4u * i;
    let row = im2col_div(first, per_row);
    if (row >= p.c_in * taps) {
        out4[i] = vec4<OUT>(0.0);
        return;
    }
    let rem = first - row * per_row;
    let nn = im2col_div(rem, plane);
    let pos = rem - nn * plane;
    var oy = im2col_div(pos, p.ow);
    var ox = pos - oy * p.ow;
    let ci = im2col_div(row, taps);
    let tap = row - ci * taps;
    let ky = im2col_div(tap, p.kw);
    let kx = tap - ky * p.kw;
    let base = (nn * p.c_in + ci) * p.h * p.w;
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j += 1u) {
        let iy = i32(oy * p.sh + ky * p.dh) - i32(p.ph);
        let ix = i32(ox * p.sw + kx * p.dw) - i32(p.pw);
        v[j] = conv_x(base, iy, ix);
        ox += 1u;
        if (ox == p.ow) {
            ox = 0u;
            oy += 1u;
        }
    }
    out4[i] = vec4<OUT>(v);
}

// The output position t / s of a tap at offset t (0xffffffff where s does not divide t or t
// is negative): stride 1 without a division.
fn col2im_tap(t: i32, s: u32) -> u32 {
    if (s == 1u) {
        return u32(t);
    }
    return div_exact(t, s);
}

// dx from the gradient of the im2col matrix, dcols ((ci, ky, kx), n, (oy, ox)) or
// (n, (ci, ky, kx), (oy, ox)): each input element sums the entries of the taps that read it.
@compute @workgroup_size(256)
fn conv2d_col2im_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    let in_plane = p.h * p.w;
    if (i >= p.n * p.c_in * in_plane) { return; }
    let sample_ci = im2col_div(i, in_plane);
    let rem = i - sample_ci * in_plane;
    let iy = im2col_div(rem, p.w);
    let ix = rem - iy * p.w;
    let taps = p.kh * p.kw;
    // Row (ci, 0, 0) of sample nn, where sample_ci = nn * c_in + ci and rows run over
    // (ci, ky, kx): p.chunk apart from sample to sample and p.splits from row to row.
    let nn = im2col_div(sample_ci, p.c_in);
    let ci = sample_ci - nn * p.c_in;
    let base = nn * p.chunk + ci * taps * p.splits;
    var acc = 0.0;
    for (var ky = 0u; ky < p.kh; ky += 1u) {
        let oy = col2im_tap(i32(iy + p.ph) - i32(ky * p.dh), p.sh);
        if (oy >= p.oh) { continue; }
        for (var kx = 0u; kx < p.kw; kx += 1u) {
            let ox = col2im_tap(i32(ix + p.pw) - i32(kx * p.dw), p.sw);
            if (ox >= p.ow) { continue; }
            acc += f32(a[base + (ky * p.kw + kx) * p.splits + oy * p.ow + ox]);
        }
    }
    out[i] = OUT(acc);
}

# NB random slopes: simulate a paired design with donor-specific responses and fit it with glmmTMB (nbinom2).
# Usage: Rscript run_glmm_slopes.R OUTDIR
# Writes OUTDIR/{counts.mtx.gz, obs.csv, truth.csv, cell_glmmTMB_slope_ML.csv, cell_glmmTMB_slope_REML.csv}.
# Model: y ~ condition + (1 + condition | donor) + offset(log total), family = nbinom2, Laplace; ML and REML=TRUE.
suppressPackageStartupMessages({library(Matrix); library(glmmTMB)})
args <- commandArgs(TRUE)
out <- if (length(args)) args[1] else "sim_slope_small"
dir.create(out, recursive = TRUE, showWarnings = FALSE)

set.seed(20261130)
n_donors <- 8; n_genes <- 80
samples <- expand.grid(condition = c("ctrl", "case"), donor = seq_len(n_donors) - 1, stringsAsFactors = FALSE)
samples$n <- sample(150:300, nrow(samples), replace = TRUE)
obs <- samples[rep(seq_len(nrow(samples)), samples$n), c("donor", "condition")]
n <- nrow(obs)
obs$cell <- sprintf("c%05d", seq_len(n) - 1)
obs$sample <- paste0("d", obs$donor, "_", obs$condition)
obs$size_factor <- exp(rnorm(n, 0, 0.35))
case <- as.numeric(obs$condition == "case")
d <- obs$donor + 1

# per gene: mean, NB2 dispersion, condition effect (25 % DE), donor intercept and slope SDs and their correlation
truth <- data.frame(gene = sprintf("g%05d", seq_len(n_genes) - 1),
                    log_mu = runif(n_genes, -1.5, 1.5), phi = runif(n_genes, 0.1, 0.6),
                    is_de = runif(n_genes) < 0.25, sd_donor = runif(n_genes, 0.2, 0.5),
                    sd_slope = runif(n_genes, 0.15, 0.4), cor = runif(n_genes, -0.6, 0.6))
truth$logfc <- ifelse(truth$is_de, sample(c(-0.5, 0.5), n_genes, replace = TRUE), 0)
Y <- matrix(0L, n, n_genes)
for (g in seq_len(n_genes)) {
  s <- c(truth$sd_donor[g], truth$sd_slope[g])
  S <- diag(s) %*% matrix(c(1, truth$cor[g], truth$cor[g], 1), 2) %*% diag(s)
  B <- matrix(rnorm(2 * n_donors), n_donors) %*% chol(S)
  eta <- truth$log_mu[g] + truth$logfc[g] * case + B[d, 1] + B[d, 2] * case + log(obs$size_factor)
  Y[, g] <- rnbinom(n, size = 1 / truth$phi[g], mu = exp(eta))
}
X <- as(Matrix(Y, sparse = TRUE), "CsparseMatrix")
writeMM(X, file.path(out, "counts.mtx"))
system2("gzip", c("-f", "-n", file.path(out, "counts.mtx")))
write.csv(obs[, c("cell", "donor", "condition", "sample", "size_factor")], file.path(out, "obs.csv"),
          row.names = FALSE)
write.csv(truth, file.path(out, "truth.csv"), row.names = FALSE)

df <- data.frame(donor = factor(obs$donor), condition = factor(obs$condition, levels = c("ctrl", "case")),
                 lo = log(rowSums(Y)))
form <- y ~ condition + (1 + condition | donor) + offset(lo)
fit_one <- function(reml) {
  fit <- glmmTMB(form, data = df, family = nbinom2, REML = reml)
  cf <- summary(fit)$coefficients$cond
  vc <- VarCorr(fit)$cond$donor
  ok <- isTRUE(fit$sdr$pdHess) && fit$fit$convergence == 0
  c(coef_int = cf["(Intercept)", 1], se_int = cf["(Intercept)", 2],
    coef = cf["conditioncase", 1], se = cf["conditioncase", 2], p = cf["conditioncase", 4],
    var_donor = vc[1, 1], var_slope = vc[2, 2], cor = attr(vc, "correlation")[1, 2],
    nb_disp = 1 / sigma(fit), loglik = as.numeric(logLik(fit)), ok = ok)
}
for (reml in c(FALSE, TRUE)) {
  rows <- list()
  t0 <- proc.time()[["elapsed"]]
  for (g in seq_len(n_genes)) {
    df$y <- Y[, g]
    w <- FALSE
    r <- tryCatch(withCallingHandlers(fit_one(reml), warning = function(e) {w <<- TRUE; invokeRestart("muffleWarning")}),
                  error = function(e) NULL)
    if (is.null(r)) next
    rows[[g]] <- data.frame(gene = truth$gene[g], t(r), warned = w)
  }
  res <- do.call(rbind, rows)
  res$ok <- as.logical(res$ok)
  tag <- if (reml) "REML" else "ML"
  write.csv(res, file.path(out, sprintf("cell_glmmTMB_slope_%s.csv", tag)), row.names = FALSE)
  message(sprintf("%s: %d genes fitted, %d ok, %d warned, %.1f s", tag, nrow(res), sum(res$ok), sum(res$warned),
                  proc.time()[["elapsed"]] - t0))
}
